"""TestImageHost on a real broker against real registries (no Docker engine involved).

The broker runs the registry v2 handshake itself: `GET /v2/`, then Basic
credentials or the Bearer token flow. Real `docker-registry` processes answer
(htpasswd, token authentication, HTTPS with the tests' CA); the HTTP fakes stand
for what is not a good registry. Registry passwords and candidate tokens are
registered with `Secrets` and must never appear in the broker's output.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.v1 import image_hosts_pb2 as pb
from broker.v1.image_hosts_pb2_grpc import ImageHostServiceStub
from tests.support.auth_helpers import Secrets, audit_records, wait_until
from tests.support.broker_process import BrokerProcess
from tests.support.registry_http_fakes import (
    ClosedPort,
    HttpServerThread,
    NotARegistry,
    RecordingRegistry,
)
from tests.support.registry_servers import RegistryServer
from tests.support.registry_token_server import TokenServer
from tests.support.status import expect_error

pytestmark = pytest.mark.integration

OK = pb.TEST_IMAGE_HOST_RESULT_OK
UNAUTHORIZED = pb.TEST_IMAGE_HOST_RESULT_UNAUTHORIZED
UNREACHABLE = pb.TEST_IMAGE_HOST_RESULT_UNREACHABLE
TLS_ERROR = pb.TEST_IMAGE_HOST_RESULT_TLS_ERROR
NOT_A_REGISTRY = pb.TEST_IMAGE_HOST_RESULT_NOT_A_REGISTRY
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def add_host(
    hosts: ImageHostServiceStub, image_host_id: str, url: str, username: str = "", token: str = ""
) -> pb.ImageHost:
    return hosts.CreateImageHost(
        pb.CreateImageHostRequest(
            image_host_id=image_host_id,
            image_host=pb.ImageHost(url=url, username=username, access_token=token),
        )
    )


def add_registry_host(
    hosts: ImageHostServiceStub,
    secrets: Secrets,
    image_host_id: str,
    registry: RegistryServer,
    password: str | None = None,
) -> pb.ImageHost:
    token = secrets.add(registry.password if password is None else password)
    return add_host(hosts, image_host_id, registry.url, registry.username, token)


def check(
    hosts: ImageHostServiceStub,
    image_host_id: str,
    candidate: tuple[str, str] | None = None,
) -> pb.TestImageHostResponse:
    request = pb.TestImageHostRequest(name=f"imageHosts/{image_host_id}")
    if candidate is not None:
        request.use_candidate_credentials = True
        request.candidate_username, request.candidate_access_token = candidate
    return hosts.TestImageHost(request, timeout=60)


def describe(answer: pb.TestImageHostResponse) -> str:
    return f"{pb.TestImageHostResult.Name(answer.result)}: {answer.message}"


def audits_of(broker: BrokerProcess, count: int) -> list[dict[str, Any]]:
    wait_until(
        lambda: broker.text().count('"TestImageHost"') >= count, "the TestImageHost audit lines"
    )
    return [r for r in audit_records(broker.text()) if r.get("audit") == "TestImageHost"]


# -- registries that accept -------------------------------------------------------------


def test_basic_registry_accepts_the_stored_credentials(
    broker: BrokerProcess,
    hosts: ImageHostServiceStub,
    registry_basic_bare: RegistryServer,
    secrets: Secrets,
) -> None:
    add_registry_host(hosts, secrets, "basic", registry_basic_bare)

    answer = check(hosts, "basic")

    assert answer.result == OK, describe(answer)
    assert answer.auth_scheme == "basic"
    assert answer.endpoint == f"{registry_basic_bare.url}/v2/"
    assert answer.HasField("latency")
    assert 0 < answer.latency.ToTimedelta().total_seconds() < 30
    (audit,) = audits_of(broker, 1)
    assert audit["resource"] == "imageHosts/basic"
    assert (audit["result"], audit["credentials"], audit["code"]) == ("OK", "stored", "OK")
    secrets.assert_absent(broker.text(), "the broker's output")


def test_token_registry_accepts_the_stored_credentials(
    broker: BrokerProcess,
    hosts: ImageHostServiceStub,
    registry_token_bare: RegistryServer,
    registry_token_server: TokenServer,
    secrets: Secrets,
) -> None:
    add_registry_host(hosts, secrets, "tokens", registry_token_bare)
    registry_token_server.clear_requests()

    answer = check(hosts, "tokens")

    assert answer.result == OK, describe(answer)
    assert answer.auth_scheme == "bearer"
    assert answer.latency.ToTimedelta().total_seconds() > 0
    # `docker login`'s way: a token for the registry's service, no repository scope.
    (request,) = registry_token_server.requests
    assert (request.username, request.outcome) == (registry_token_bare.username, "granted")
    assert request.service == registry_token_server.service
    assert request.scopes == ()
    secrets.assert_absent(broker.text(), "the broker's output")


def test_tls_registry_is_ok_with_the_registry_ca_file(
    tmp_path: Path, registry_tls_bare: RegistryServer, secrets: Secrets
) -> None:
    assert registry_tls_bare.ca_path is not None
    broker = BrokerProcess(
        tmp_path / "data", args=["--registry-ca-file", str(registry_tls_bare.ca_path)]
    ).start()
    try:
        hosts = broker.image_hosts()
        add_registry_host(hosts, secrets, "tls", registry_tls_bare)
        answer = check(hosts, "tls")
        assert answer.result == OK, describe(answer)
        assert answer.endpoint == f"https://{registry_tls_bare.address}/v2/"
        assert answer.auth_scheme == "basic"
        secrets.assert_absent(broker.text(), "the broker's output")
    finally:
        broker.stop()


# -- what goes wrong ----------------------------------------------------------------------


def test_wrong_password_is_unauthorized_in_the_registrys_words(
    broker: BrokerProcess,
    hosts: ImageHostServiceStub,
    registry_basic_bare: RegistryServer,
    registry_token_bare: RegistryServer,
    secrets: Secrets,
) -> None:
    for image_host_id, registry in (
        ("basic", registry_basic_bare),
        ("tokens", registry_token_bare),
    ):
        secrets.add(registry.password)
        wrong = registry.password + "-wrong"
        add_registry_host(hosts, secrets, image_host_id, registry, password=wrong)
        answer = check(hosts, image_host_id)
        assert answer.result == UNAUTHORIZED, describe(answer)
        # distribution's (and the token server's) own words
        assert "authentication required" in answer.message
        secrets.assert_absent(answer.message, "the answer's message")
    assert [a["result"] for a in audits_of(broker, 2)] == ["UNAUTHORIZED", "UNAUTHORIZED"]
    secrets.assert_absent(broker.text(), "the broker's output")


def test_tls_registry_without_its_ca_is_a_tls_error(
    broker: BrokerProcess,
    hosts: ImageHostServiceStub,
    registry_tls_bare: RegistryServer,
    secrets: Secrets,
) -> None:
    add_registry_host(hosts, secrets, "tls", registry_tls_bare)

    answer = check(hosts, "tls")

    assert answer.result == TLS_ERROR, describe(answer)
    assert answer.endpoint == f"https://{registry_tls_bare.address}/v2/"


def test_nothing_listening_is_unreachable(
    hosts: ImageHostServiceStub, closed_port: ClosedPort
) -> None:
    add_host(hosts, "closed", closed_port.url, "someone", "some-token")

    answer = check(hosts, "closed")

    assert answer.result == UNREACHABLE, describe(answer)
    assert answer.endpoint == f"{closed_port.url}/v2/"
    assert answer.latency.ToTimedelta().total_seconds() < 10


def test_a_web_server_is_not_a_registry(
    hosts: ImageHostServiceStub, not_a_registry: NotARegistry
) -> None:
    add_host(hosts, "web", not_a_registry.url, "someone", "some-token")

    answer = check(hosts, "web")

    assert answer.result == NOT_A_REGISTRY, describe(answer)
    assert "404" in answer.message
    # The credentials went nowhere: /v2/ alone was asked, without them.
    assert [(r.path, r.authorization is None) for r in not_a_registry.requests] == [("/v2/", True)]


def test_missing_host_is_not_found(hosts: ImageHostServiceStub) -> None:
    error = expect_error(lambda: check(hosts, "nope"))
    assert error.code == grpc.StatusCode.NOT_FOUND


# -- candidate credentials ----------------------------------------------------------------


def test_candidate_credentials_are_used_once_and_never_stored(
    broker: BrokerProcess,
    hosts: ImageHostServiceStub,
    registry_basic_bare: RegistryServer,
    registry_token_bare: RegistryServer,
    secrets: Secrets,
) -> None:
    # One host with a stale token, one without any.
    stale = add_registry_host(hosts, secrets, "stale", registry_basic_bare, "stale-password-1")
    anonymous = add_host(hosts, "anonymous", registry_token_bare.url)

    for before, registry in ((stale, registry_basic_bare), (anonymous, registry_token_bare)):
        candidate = (registry.username, secrets.add(registry.password))
        answer = check(hosts, before.name.removeprefix("imageHosts/"), candidate)
        assert answer.result == OK, describe(answer)
        after = hosts.GetImageHost(pb.GetImageHostRequest(name=before.name))
        # Nothing about the host changed: not the token, not its version.
        assert after.access_token_set == before.access_token_set
        assert (after.etag, after.username) == (before.etag, before.username)

    # The stored credentials are what they were.
    assert check(hosts, "stale").result == UNAUTHORIZED
    answer = check(hosts, "anonymous")
    assert (answer.result, answer.message) == (OK, "anonymous access works")
    # Anonymous candidates (both empty) try without credentials.
    answer = check(hosts, "stale", ("", ""))
    assert (answer.result, answer.message) == (UNAUTHORIZED, "the registry requires credentials")

    audits = audits_of(broker, 5)
    assert [(a["resource"], a["credentials"], a["result"]) for a in audits] == [
        ("imageHosts/stale", "candidate", "OK"),
        ("imageHosts/anonymous", "candidate", "OK"),
        ("imageHosts/stale", "stored", "UNAUTHORIZED"),
        ("imageHosts/anonymous", "stored", "OK"),
        ("imageHosts/stale", "candidate", "UNAUTHORIZED"),
    ]
    secrets.assert_absent(broker.text(), "the broker's output")


def test_candidate_credentials_follow_the_rules_of_stored_ones(
    hosts: ImageHostServiceStub, registry_basic_bare: RegistryServer
) -> None:
    add_host(hosts, "basic", registry_basic_bare.url)
    for candidate, field_name in (
        (("", "a-token"), "candidate_access_token"),
        (("user:name", "a-token"), "candidate_username"),
    ):
        error = expect_error(lambda: check(hosts, "basic", candidate))  # noqa: B023
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field_name in error.violations


# -- credentials go where the registry says, and nowhere else ------------------------------


@dataclass(frozen=True)
class Seen:
    """A request a scripted server got: its path and the scheme of its Authorization
    (the credentials themselves are kept out of reprs and comparisons)."""

    path: str
    scheme: str | None = None
    authorization: str | None = field(default=None, repr=False, compare=False)


class ScriptedServer:
    """An HTTP server on 127.0.0.1 whose answers a test writes; records what it is sent."""

    def __init__(self, answer: Callable[[str, str], tuple[int, dict[str, str]]]) -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._server = HttpServerThread(self._handler(), name="scripted server")

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                authorization = self.headers.get("Authorization")
                scheme = authorization.split(" ", 1)[0] if authorization else None
                with server._lock:
                    server._seen.append(Seen(self.path, scheme, authorization))
                status, headers = server._answer(server.url, self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        return Handler

    def __enter__(self) -> ScriptedServer:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop()


@pytest.fixture
def bystander() -> Iterator[RecordingRegistry]:
    """A registry no challenge names: it must never hear from the broker."""
    server = RecordingRegistry().start()
    try:
        yield server
    finally:
        server.stop()


def test_credentials_go_to_the_realm_the_registry_names_and_nowhere_else(
    broker: BrokerProcess,
    hosts: ImageHostServiceStub,
    recording_registry: RecordingRegistry,
    bystander: RecordingRegistry,
    secrets: Secrets,
) -> None:
    user, password = "user-a", secrets.add("password-of-host-a-7Qe")
    realm = f"{recording_registry.url}/token"

    def registry(url: str, path: str) -> tuple[int, dict[str, str]]:
        challenge = f'Bearer realm="{realm}",service="registry-a"'
        return 401, {**API_VERSION, "WWW-Authenticate": challenge}

    with ScriptedServer(registry) as registry_a:
        add_host(hosts, "a", registry_a.url, user, password)
        answer = check(hosts, "a")

    # The token service (the recorder) refused: UNAUTHORIZED, in its words.
    assert answer.result == UNAUTHORIZED, describe(answer)
    assert answer.auth_scheme == "bearer"
    # The registry itself never got the password: one ping, without credentials.
    assert registry_a.seen == [Seen("/v2/", None)]
    # The realm it named got them once, for its service...
    (request,) = recording_registry.requests
    assert request.path == "/token?service=registry-a"
    if request.authorization != basic(user, password):
        pytest.fail("the realm did not get host a's credentials as Basic credentials")
    # ...and no one else heard anything.
    assert [r.path for r in bystander.requests] == []
    secrets.assert_absent(broker.text(), "the broker's output")


def test_credentials_do_not_follow_redirects(
    hosts: ImageHostServiceStub, bystander: RecordingRegistry, secrets: Secrets
) -> None:
    elsewhere = f"{bystander.url}/v2/"

    def redirecting_registry(url: str, path: str) -> tuple[int, dict[str, str]]:
        return 307, {**API_VERSION, "Location": elsewhere}

    def redirecting_realm(url: str, path: str) -> tuple[int, dict[str, str]]:
        if path.startswith("/token"):
            return 302, {"Location": f"{bystander.url}/token"}
        return 401, {**API_VERSION, "WWW-Authenticate": f'Bearer realm="{url}/token"'}

    password = secrets.add("password-of-host-b-2Wd")
    with ScriptedServer(redirecting_registry) as registry_b:
        add_host(hosts, "b", registry_b.url, "user-b", password)
        answer = check(hosts, "b")
    assert answer.result == NOT_A_REGISTRY, describe(answer)
    assert registry_b.seen == [Seen("/v2/", None)]

    with ScriptedServer(redirecting_realm) as registry_c:
        add_host(hosts, "c", registry_c.url, "user-c", password)
        answer = check(hosts, "c")
    assert answer.result == UNAUTHORIZED, describe(answer)
    # The realm got the credentials; where it redirected to did not.
    assert registry_c.seen == [Seen("/v2/"), Seen("/token", "Basic")]
    assert [r.path for r in bystander.requests] == []


def test_managing_hosts_never_contacts_a_registry(
    hosts: ImageHostServiceStub, recording_registry: RecordingRegistry
) -> None:
    created = add_host(hosts, "rec", recording_registry.url, "someone", "some-token-4Rt")
    hosts.ListImageHosts(pb.ListImageHostsRequest())
    hosts.GetImageHost(pb.GetImageHostRequest(name=created.name))
    hosts.SetDefaultImageHost(pb.SetDefaultImageHostRequest(name=created.name, reason="test"))
    hosts.GetDefaultImageHost(pb.GetDefaultImageHostRequest())
    listed = hosts.ListImageHosts(pb.ListImageHostsRequest())
    assert created.name in [h.name for h in listed.image_hosts]
    assert [r.path for r in recording_registry.requests] == []
    # Only TestImageHost does.
    check(hosts, "rec")
    assert [r.path for r in recording_registry.requests] == ["/v2/", "/v2/"]
