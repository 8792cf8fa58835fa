"""The Docker test bed itself: a real dockerd and real registries behave as later tests assume.

Fixtures are in `tests/integration/conftest.py`. Every pull here goes through the
real engine; the registry's own error text is what the engine reports.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import socket
import ssl
import time
import urllib.parse
from pathlib import Path

import docker
import pytest

from tests.support.docker_engine import DockerEngine, DockerPullError
from tests.support.netns_link import TEST_NET, TestNetwork
from tests.support.registry_http_fakes import (
    ClosedPort,
    NotARegistry,
    RecordingRegistry,
    SilentPort,
)
from tests.support.registry_servers import RegistryCA, RegistryServer, encode_registry_auth
from tests.support.registry_token_server import TokenServer

pytestmark = pytest.mark.integration

# Failures must come at once, not after the engine's ~10 s TLS handshake timeout.
FAST_FAILURE = 5.0


def _basic(username: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


def _wrong(server: RegistryServer) -> dict[str, str]:
    return {**server.auth_config(), "password": server.password + "-wrong"}


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "http"
    assert parts.hostname is not None
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def _post_form(url: str, form: dict[str, str]) -> tuple[int, dict[str, object]]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        connection.request(
            "POST",
            parts.path,
            body=urllib.parse.urlencode(form),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = connection.getresponse()
        answer: dict[str, object] = json.loads(response.read())
        return response.status, answer
    finally:
        connection.close()


def _assert_not_present(engine: DockerEngine, reference: str) -> None:
    with pytest.raises(docker.errors.ImageNotFound):
        engine.client.images.get(reference)


# -- the engine -----------------------------------------------------------------------


def test_engine_answers_on_its_own_socket(docker_engine: DockerEngine) -> None:
    assert docker_engine.docker_host == f"unix://{docker_engine.socket_path}"
    client = docker.DockerClient(base_url=docker_engine.docker_host)
    try:
        assert client.ping()
        info = client.info()
    finally:
        client.close()
    assert info["Driver"] == "vfs"
    assert info["DockerRootDir"] == str(docker_engine.data_root)
    assert info["CgroupDriver"] == "cgroupfs"
    # Its own containerd under its exec root; the daemon lives in its own mount namespace.
    assert (docker_engine.exec_root / "containerd" / "containerd.sock").exists()
    own_namespace = os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{docker_engine.pid}/ns/mnt") != own_namespace


def test_engine_runs_an_imported_image(docker_scratch: DockerEngine) -> None:
    docker_scratch.import_image("credbroker-testbed/local:1", "local-marker")
    assert docker_scratch.run("credbroker-testbed/local:1") == "local-marker\n"
    assert docker_scratch.run("credbroker-testbed/local:1", ["/bin/sh", "-c", "echo $((6*7))"]) == (
        "42\n"
    )


def test_engine_sees_its_own_etc_docker(docker_engine: DockerEngine) -> None:
    probe = docker_engine.certs_d / "credbroker-probe"
    probe.write_text("probe\n")
    try:
        # /proc/<pid>/root resolves paths in the daemon's mount namespace.
        inside = Path(f"/proc/{docker_engine.pid}/root/etc/docker")
        assert (inside / "certs.d" / "credbroker-probe").read_text() == "probe\n"
        assert not Path("/etc/docker/certs.d/credbroker-probe").exists()
        if Path("/etc/docker/registry").exists():
            assert not (inside / "registry").exists()
    finally:
        probe.unlink()


# -- basic-auth registry ---------------------------------------------------------------


def test_basic_registry_handshake(registry_basic_bare: RegistryServer) -> None:
    registry_basic = registry_basic_bare
    status, headers = registry_basic.get("/v2/")
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="basic-realm"'
    assert headers["docker-distribution-api-version"] == "registry/2.0"
    status, _ = registry_basic.get("/v2/", _basic(registry_basic.username, registry_basic.password))
    assert status == 200
    status, _ = registry_basic.get("/v2/", _basic(registry_basic.username, "wrong"))
    assert status == 401


def test_basic_registry_refuses_an_anonymous_pull(
    docker_scratch: DockerEngine, registry_basic: RegistryServer
) -> None:
    with pytest.raises(DockerPullError) as caught:
        docker_scratch.pull(registry_basic.image)
    assert caught.value.message.endswith("no basic auth credentials")
    assert caught.value.status_code == 500
    _assert_not_present(docker_scratch, registry_basic.image)


def test_basic_registry_refuses_a_wrong_password(
    docker_scratch: DockerEngine, registry_basic: RegistryServer
) -> None:
    with pytest.raises(DockerPullError) as caught:
        docker_scratch.pull(registry_basic.image, _wrong(registry_basic))
    assert "unauthorized: authentication required" in caught.value.message
    _assert_not_present(docker_scratch, registry_basic.image)


def test_basic_registry_pull_with_credentials_runs(
    docker_scratch: DockerEngine, registry_basic: RegistryServer
) -> None:
    result = docker_scratch.pull(registry_basic.image, registry_basic.auth_config())
    assert result.digest == registry_basic.image_digest
    assert docker_scratch.run(registry_basic.image) == f"{registry_basic.image_marker}\n"


def test_basic_registry_pull_with_a_raw_x_registry_auth_header(
    docker_scratch: DockerEngine, registry_basic: RegistryServer
) -> None:
    header = registry_basic.registry_auth()
    assert json.loads(base64.urlsafe_b64decode(header)) == registry_basic.auth_config()
    result = docker_scratch.pull_with_header(registry_basic.image_by_digest, header)
    assert result.digest == registry_basic.image_digest
    # A malformed header is ignored by the engine: the pull is anonymous.
    with pytest.raises(DockerPullError) as caught:
        docker_scratch.pull_with_header(registry_basic.image, "%%%not-base64%%%")
    assert "no basic auth credentials" in caught.value.message


def test_passwords_stay_out_of_logs_and_reprs(
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    registry_token: RegistryServer,
    registry_token_server: TokenServer,
) -> None:
    docker_scratch.pull(registry_basic.image, registry_basic.auth_config())
    docker_scratch.pull(registry_token.image, registry_token.auth_config())
    for server in (registry_basic, registry_token):
        assert server.password
        assert server.password not in repr(server)
        assert server.password not in server.log_path.read_text()
        assert server.password not in server.config_path.read_text()
        assert server.password not in docker_scratch.log_path.read_text()
    assert registry_token.password not in repr(registry_token_server.requests)


# -- token-auth registry ---------------------------------------------------------------


def test_token_registry_handshake(
    registry_token_bare: RegistryServer, registry_token_server: TokenServer
) -> None:
    status, headers = registry_token_bare.get("/v2/")
    assert status == 401
    assert headers["www-authenticate"] == (
        f'Bearer realm="{registry_token_server.realm}",service="{registry_token_server.service}"'
    )
    assert headers["docker-distribution-api-version"] == "registry/2.0"


def test_token_server_rejects_wrong_credentials(
    registry_token_bare: RegistryServer, registry_token_server: TokenServer
) -> None:
    registry_token = registry_token_bare
    query = urllib.parse.urlencode(
        {"service": registry_token_server.service, "scope": "repository:team/tool:pull"}
    )
    url = f"{registry_token_server.realm}?{query}"
    for username, password in (
        (registry_token.username, registry_token.password + "x"),
        ("nobody", registry_token.password),
        (registry_token.username, ""),
    ):
        status, headers, body = _get(url, _basic(username, password))
        assert status == 401
        assert headers["www-authenticate"].startswith("Basic realm=")
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    denied = [r for r in registry_token_server.requests if r.outcome == "denied"]
    assert {r.username for r in denied} >= {registry_token.username, "nobody"}


def test_token_server_tokens_are_what_the_registry_accepts(
    registry_token: RegistryServer, registry_token_server: TokenServer
) -> None:
    def token(scope: str | None) -> str:
        query = {"service": registry_token_server.service, **({"scope": scope} if scope else {})}
        status, _, body = _get(
            f"{registry_token_server.realm}?{urllib.parse.urlencode(query)}",
            _basic(registry_token.username, registry_token.password),
        )
        assert status == 200
        answer = json.loads(body)
        assert answer["token"] == answer["access_token"]
        assert answer["expires_in"] == registry_token_server.expires_in
        assert answer["issued_at"]
        value: str = answer["token"]
        return value

    manifest = f"/v2/{registry_token.repository}/manifests/{registry_token.tag}"
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    # `docker login`: a token without scope opens /v2/.
    login = token(None)
    assert registry_token.get("/v2/", {"Authorization": f"Bearer {login}"})[0] == 200
    # ...but not the repository: too little access is not an error of the token server.
    assert registry_token.get(manifest, {"Authorization": f"Bearer {login}", **accept})[0] == 401
    pull = token(f"repository:{registry_token.repository}:pull")
    status, headers = registry_token.get(manifest, {"Authorization": f"Bearer {pull}", **accept})
    assert status == 200
    assert headers["docker-content-digest"] == registry_token.image_digest
    # A token the registry did not sign for is refused.
    forged = pull[:-4] + ("AAAA" if not pull.endswith("AAAA") else "BBBB")
    assert registry_token.get(manifest, {"Authorization": f"Bearer {forged}", **accept})[0] == 401


def test_token_server_grants_no_more_than_the_user_has(
    registry_token: RegistryServer, registry_token_server: TokenServer
) -> None:
    registry_token_server.add_user("reader", "reader-secret", actions=("pull",))
    query = urllib.parse.urlencode(
        {"service": registry_token_server.service, "scope": "repository:team/tool:pull,push"}
    )
    status, _, _ = _get(f"{registry_token_server.realm}?{query}", _basic("reader", "reader-secret"))
    assert status == 200
    last = registry_token_server.requests[-1]
    assert last.username == "reader"
    assert last.granted == (("repository", "team/tool", ("pull",)),)


def test_token_registry_refuses_an_anonymous_pull(
    docker_scratch: DockerEngine, registry_token: RegistryServer
) -> None:
    with pytest.raises(DockerPullError) as caught:
        docker_scratch.pull(registry_token.image)
    assert "denied: requested access to the resource is denied" in caught.value.message
    _assert_not_present(docker_scratch, registry_token.image)


def test_token_registry_refuses_a_wrong_password(
    docker_scratch: DockerEngine, registry_token: RegistryServer
) -> None:
    with pytest.raises(DockerPullError) as caught:
        docker_scratch.pull(registry_token.image, _wrong(registry_token))
    assert caught.value.message.endswith("unauthorized")
    _assert_not_present(docker_scratch, registry_token.image)


def test_token_registry_pull_with_credentials_runs(
    docker_scratch: DockerEngine,
    registry_token: RegistryServer,
    registry_token_server: TokenServer,
) -> None:
    registry_token_server.clear_requests()
    result = docker_scratch.pull(registry_token.image, registry_token.auth_config())
    assert result.digest == registry_token.image_digest
    assert docker_scratch.run(registry_token.image) == f"{registry_token.image_marker}\n"
    granted = [r for r in registry_token_server.requests if r.outcome == "granted"]
    assert granted
    assert all(r.username == registry_token.username for r in granted)
    assert ("repository", registry_token.repository, ("pull",)) in granted[-1].granted


def test_token_server_refresh_token_works_as_an_identity_token(
    docker_scratch: DockerEngine,
    registry_token: RegistryServer,
    registry_token_server: TokenServer,
) -> None:
    form = {
        "grant_type": "password",
        "service": registry_token_server.service,
        "client_id": "credbroker-tests",
        "access_type": "offline",
        "scope": f"repository:{registry_token.repository}:pull",
        "username": registry_token.username,
    }
    status, answer = _post_form(
        registry_token_server.realm, {**form, "password": registry_token.password + "x"}
    )
    assert (status, answer) == (401, {"error": "invalid_grant"})
    status, answer = _post_form(
        registry_token_server.realm, {**form, "password": registry_token.password}
    )
    assert status == 200
    refresh_token = answer["refresh_token"]
    assert isinstance(refresh_token, str)
    registry_token_server.clear_requests()
    # The engine trades an identity token for access tokens with grant_type=refresh_token.
    result = docker_scratch.pull(
        registry_token.image,
        {"identitytoken": refresh_token, "serveraddress": registry_token.address},
    )
    assert result.digest == registry_token.image_digest
    used = [r for r in registry_token_server.requests if r.outcome == "granted"]
    assert used
    assert {(r.method, r.username) for r in used} == {("POST", registry_token.username)}


# -- TLS registries ---------------------------------------------------------------------


def test_tls_registry_on_loopback_needs_the_ca(registry_tls_bare: RegistryServer) -> None:
    registry_tls = registry_tls_bare
    assert registry_tls.url.startswith("https://127.0.0.1:")
    assert registry_tls.ca_path is not None
    status, headers = registry_tls.get("/v2/")  # verified against the CA file
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="tls-realm"'
    context = ssl.create_default_context()  # the system's CAs only
    with (
        socket.create_connection((registry_tls.host, registry_tls.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        context.wrap_socket(raw, server_hostname=registry_tls.host)


def test_tls_registry_on_loopback_pull_with_credentials(
    docker_scratch: DockerEngine, registry_tls: RegistryServer
) -> None:
    # The engine does not verify 127.0.0.0/8 registries: this proves auth, not CA trust.
    result = docker_scratch.pull(registry_tls.image, registry_tls.auth_config())
    assert result.digest == registry_tls.image_digest
    assert docker_scratch.run(registry_tls.image) == f"{registry_tls.image_marker}\n"


def test_netns_registry_is_on_the_test_network(
    registry_tls_netns: RegistryServer, netns_network: TestNetwork
) -> None:
    for address in (registry_tls_netns.address, *registry_tls_netns.aliases):
        host = ipaddress.ip_address(address.rsplit(":", 1)[0])
        assert host in TEST_NET
        assert not host.is_loopback
    assert ipaddress.ip_address(netns_network.host_address) in TEST_NET
    status, _ = registry_tls_netns.get("/v2/")
    assert status == 401
    status, _ = registry_tls_netns.get("/v2/", address=registry_tls_netns.aliases[0])
    assert status == 401


def test_netns_tls_registry_is_trusted_through_certs_d(
    docker_scratch: DockerEngine, registry_tls_netns: RegistryServer
) -> None:
    assert (docker_scratch.certs_d / registry_tls_netns.address / "ca.crt").exists()
    with pytest.raises(DockerPullError) as caught:
        docker_scratch.pull(registry_tls_netns.image)
    assert caught.value.message.endswith("no basic auth credentials")
    result = docker_scratch.pull(registry_tls_netns.image, registry_tls_netns.auth_config())
    assert result.digest == registry_tls_netns.image_digest
    assert docker_scratch.run(registry_tls_netns.image) == f"{registry_tls_netns.image_marker}\n"


def test_netns_tls_registry_without_the_ca_fails(
    docker_scratch: DockerEngine, registry_tls_netns: RegistryServer
) -> None:
    untrusted = registry_tls_netns.aliases[0]
    assert not (docker_scratch.certs_d / untrusted).exists()
    reference = f"{untrusted}/{registry_tls_netns.repository}:{registry_tls_netns.tag}"
    started = time.monotonic()
    with pytest.raises(DockerPullError) as caught:
        docker_scratch.pull(reference, registry_tls_netns.auth_config(untrusted))
    assert "x509: certificate signed by unknown authority" in caught.value.message
    assert time.monotonic() - started < FAST_FAILURE


# -- servers that are not (good) registries --------------------------------------------


def test_recording_registry_records_what_clients_send(
    docker_scratch: DockerEngine,
    recording_registry: RecordingRegistry,
    registry_basic: RegistryServer,
) -> None:
    status, headers, _ = _get(f"{recording_registry.url}/v2/")
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="recording registry"'
    assert recording_registry.authorizations == []
    # The engine, with no credentials for it, sends none (and fails fast despite HTTPS first).
    started = time.monotonic()
    with pytest.raises(DockerPullError):
        docker_scratch.pull(f"{recording_registry.address}/team/tool:1.0")
    assert time.monotonic() - started < FAST_FAILURE
    assert any(r.path == "/v2/" for r in recording_registry.requests)
    assert recording_registry.authorizations == []
    # Credentials that are meant for it do arrive, and are recorded.
    config = {**registry_basic.auth_config(), "serveraddress": recording_registry.address}
    with pytest.raises(DockerPullError):
        docker_scratch.pull(f"{recording_registry.address}/team/tool:1.0", config)
    assert recording_registry.authorizations
    assert set(recording_registry.authorizations) == {
        _basic(registry_basic.username, registry_basic.password)["Authorization"]
    }
    recording_registry.clear()
    assert recording_registry.requests == []


def test_recording_registry_bearer_challenge_over_tls(registry_ca: RegistryCA) -> None:
    certificate = registry_ca.server_for("recording", ["127.0.0.1"])
    server = RecordingRegistry(challenge="bearer", certificate=certificate).start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(registry_ca.cert))
        host, port = server.address.rsplit(":", 1)
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=5)
        try:
            connection.request("GET", "/v2/", headers={"Authorization": "Bearer abc"})
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        assert response.status == 401
        assert response.getheader("WWW-Authenticate") == (
            f'Bearer realm="{server.url}/token",service="recording-registry"'
        )
        assert server.authorizations == ["Bearer abc"]
    finally:
        server.stop()


def test_not_a_registry_answers_html(
    docker_scratch: DockerEngine, not_a_registry: NotARegistry
) -> None:
    status, headers, body = _get(f"{not_a_registry.url}/v2/")
    assert status == 404
    assert headers["content-type"].startswith("text/html")
    assert "docker-distribution-api-version" not in headers
    assert body.startswith(b"<!doctype html>")
    started = time.monotonic()
    with pytest.raises(DockerPullError):
        docker_scratch.pull(f"{not_a_registry.address}/team/tool:1.0")
    assert time.monotonic() - started < FAST_FAILURE
    assert not_a_registry.requests


def test_closed_port_refuses(docker_scratch: DockerEngine, closed_port: ClosedPort) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", closed_port.port), timeout=5).close()
    started = time.monotonic()
    with pytest.raises(DockerPullError) as caught:
        docker_scratch.pull(f"{closed_port.address}/team/tool:1.0")
    assert "connection refused" in caught.value.message
    assert time.monotonic() - started < FAST_FAILURE


def test_silent_port_never_answers(silent_port: SilentPort) -> None:
    with socket.create_connection(("127.0.0.1", silent_port.port), timeout=5) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)


def test_encode_registry_auth_is_base64url_with_padding() -> None:
    config = {"username": "u", "password": "??~~~", "serveraddress": "h:1"}
    value = encode_registry_auth(config)
    # Standard base64 of this JSON has "/", "+" and one "=": url-safe keeps the padding.
    assert value.endswith("=")
    assert not value.endswith("==")
    assert "+" not in value
    assert "/" not in value
    assert {"-", "_"} <= set(value)
    assert json.loads(base64.urlsafe_b64decode(value)) == config
