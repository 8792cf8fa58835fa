"""PullImage over real gRPC, on a real dockerd, from real registries.

The broker runs as its own process with DOCKER_HOST pointing at the test bed's
engine; every pull goes broker -> dockerd -> registry, and every failure is the
engine's or the registry's own words, classified by the broker. Registry
passwords are registered with `Secrets`: they must never show up in the
broker's output or in an error message, and failure messages never print them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker.errors
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.v1 import credentials_pb2, credentials_pb2_grpc, pulls_pb2, pulls_pb2_grpc
from broker.v1 import image_hosts_pb2 as pb
from broker.v1.image_hosts_pb2_grpc import ImageHostServiceStub
from tests.support.auth_helpers import Secrets, audit_records, wait_until
from tests.support.broker_process import BrokerProcess
from tests.support.docker_engine import DockerEngine, rootfs_tar
from tests.support.registry_http_fakes import (
    ClosedPort,
    RecordingRegistry,
    reject_tls_handshake,
)
from tests.support.registry_servers import RegistryServer
from tests.support.registry_token_server import TokenServer
from tests.support.status import expect_error

pytestmark = pytest.mark.integration

PULL_TIMEOUT = 60.0
#: Bytes per second the throttling proxy lets through for the cancellation tests.
SLOW_RATE = 250_000


# -- helpers --------------------------------------------------------------------------


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()


@pytest.fixture
def pull_broker(tmp_path: Path, docker_engine: DockerEngine) -> Iterator[BrokerProcess]:
    """A fresh broker whose engine is the test bed's dockerd."""
    process = BrokerProcess(
        tmp_path / "data", env={"DOCKER_HOST": docker_engine.docker_host}
    ).start()
    try:
        yield process
    finally:
        process.stop()


def add_host(
    broker: BrokerProcess,
    image_host_id: str,
    url: str,
    username: str = "",
    token: str = "",
    *,
    default: bool = False,
) -> None:
    hosts: ImageHostServiceStub = broker.image_hosts()
    hosts.CreateImageHost(
        pb.CreateImageHostRequest(
            image_host_id=image_host_id,
            image_host=pb.ImageHost(url=url, username=username, access_token=token),
        )
    )
    if default:
        hosts.SetDefaultImageHost(
            pb.SetDefaultImageHostRequest(name=f"imageHosts/{image_host_id}", reason="test")
        )


def add_registry_host(
    broker: BrokerProcess,
    secrets: Secrets,
    image_host_id: str,
    registry: RegistryServer,
    *,
    password: str | None = None,
    default: bool = False,
) -> None:
    """A host for `registry` with its user and password (or another `password`)."""
    token = secrets.add(registry.password if password is None else password)
    add_host(broker, image_host_id, registry.url, registry.username, token, default=default)


@dataclass
class Pulled:
    progress: list[pulls_pb2.LayerProgress] = field(default_factory=list)
    result: pulls_pb2.PullResult | None = None


def pull(broker: BrokerProcess, image: str, **options: object) -> Pulled:
    """PullImage to the end; checks that the result is the last message and the only one."""
    stub = pulls_pb2_grpc.PullServiceStub(broker.channel())
    pulled = Pulled()
    request = pulls_pb2.PullImageRequest(image=image, **options)
    for message in stub.PullImage(request, timeout=PULL_TIMEOUT):
        assert pulled.result is None, "a message came after the result"
        if message.HasField("result"):
            pulled.result = message.result
        else:
            assert message.HasField("progress")
            pulled.progress.append(message.progress)
    assert pulled.result is not None, "the stream ended without a result"
    return pulled


def assert_not_present(engine: DockerEngine, image: str) -> None:
    with pytest.raises(docker.errors.ImageNotFound):
        engine.client.images.get(image)


def pull_audits(broker: BrokerProcess) -> list[dict[str, str]]:
    wait_until(lambda: '"PullImage"' in broker.text(), "the PullImage audit line")
    return [r for r in audit_records(broker.text()) if r.get("audit") == "PullImage"]


# -- a private image, end to end --------------------------------------------------------


def test_private_image_pulls_through_the_broker_and_runs(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    secrets: Secrets,
) -> None:
    add_registry_host(pull_broker, secrets, "private", registry_basic)
    assert_not_present(docker_scratch, registry_basic.image)

    pulled = pull(pull_broker, registry_basic.image)

    # Progress streams, layer by layer, before the result.
    assert pulled.progress
    layer_statuses = {(p.layer, p.status) for p in pulled.progress if p.layer}
    assert any(status == "Pull complete" for _, status in layer_statuses), layer_statuses
    assert any(p.status.startswith("Digest: sha256:") for p in pulled.progress)
    result = pulled.result
    assert result is not None
    assert result.digest == registry_basic.image_digest
    assert result.image == registry_basic.image
    assert result.image_host == "imageHosts/private"
    assert result.pinned_image == registry_basic.image_by_digest
    assert result.pinned_image == f"{registry_basic.address}/team/tool@{result.digest}"
    # What was pulled is what was pushed, and it runs.
    assert docker_scratch.run(registry_basic.image) == f"{registry_basic.image_marker}\n"
    assert docker_scratch.run(result.pinned_image) == f"{registry_basic.image_marker}\n"

    (audit,) = pull_audits(pull_broker)
    assert (audit["code"], audit["image"], audit["resource"]) == ("OK", registry_basic.image, "")
    assert audit["resolved_image"] == registry_basic.image
    assert audit["disclosed"] == "yes"
    secrets.assert_absent(pull_broker.text(), "the broker's output")


def test_registry_auth_is_returned_only_when_asked_and_is_audited(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    secrets: Secrets,
) -> None:
    add_registry_host(pull_broker, secrets, "private", registry_basic)

    plain = pull(pull_broker, registry_basic.image).result
    asked = pull(pull_broker, registry_basic.image, include_registry_auth=True).result

    assert plain is not None
    assert asked is not None
    assert plain.registry_auth == ""
    assert plain.backend == asked.backend == pulls_pb2.PULL_BACKEND_DOCKER
    assert list(asked.nodes) == []
    # The header value is what ResolveCredentials hands out for the same image.
    resolved = credentials_pb2_grpc.CredentialServiceStub(pull_broker.channel()).ResolveCredentials(
        credentials_pb2.ResolveCredentialsRequest(image=registry_basic.image), timeout=10
    )
    assert asked.registry_auth == resolved.registry_auth
    decoded = json.loads(base64.urlsafe_b64decode(asked.registry_auth))
    assert decoded["username"] == registry_basic.username
    assert decoded["serveraddress"] == registry_basic.address
    first, second = pull_audits(pull_broker)
    assert "registry_auth_returned" not in first
    assert second["registry_auth_returned"] == "yes"
    secrets.assert_absent(pull_broker.text(), "the broker's output")


@pytest.mark.parametrize(
    ("options", "field", "rule"),
    [
        ({"backend": 9}, "backend", "must be UNSPECIFIED, DOCKER or SWARM"),
        (
            {
                "backend": pulls_pb2.PULL_BACKEND_DOCKER,
                "placement_constraints": ["node.role==worker"],
            },
            "placement_constraints",
            "apply to Swarm pulls only",
        ),
        (
            {"backend": pulls_pb2.PULL_BACKEND_SWARM, "platform": "linux/amd64"},
            "platform",
            "applies to Docker pulls only",
        ),
    ],
)
def test_options_that_do_not_fit_the_backend_are_invalid(
    pull_broker: BrokerProcess, options: dict[str, object], field: str, rule: str
) -> None:
    error = expect_error(lambda: pull(pull_broker, "team/tool:1", **options))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rule in error.violations[field]


def test_swarm_pull_on_an_engine_outside_a_swarm_is_failed_precondition(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    secrets: Secrets,
) -> None:
    add_registry_host(pull_broker, secrets, "private", registry_basic)

    error = expect_error(
        lambda: pull(pull_broker, registry_basic.image, backend=pulls_pb2.PULL_BACKEND_SWARM)
    )

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "NOT_A_SWARM_MANAGER"
    assert_not_present(docker_scratch, registry_basic.image)


def test_wrong_token_is_registry_auth_failed_in_the_registrys_words(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    secrets: Secrets,
) -> None:
    wrong = registry_basic.password + "-wrong"
    add_registry_host(pull_broker, secrets, "private", registry_basic, password=wrong)
    secrets.add(registry_basic.password)

    error = expect_error(lambda: pull(pull_broker, registry_basic.image))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "REGISTRY_AUTH_FAILED"
    # distribution's own words, through the engine
    assert "unauthorized: authentication required" in error.message
    secrets.assert_absent(error.message, "the error message")
    secrets.assert_absent(pull_broker.text(), "the broker's output")
    assert_not_present(docker_scratch, registry_basic.image)
    (audit,) = pull_audits(pull_broker)
    assert (audit["code"], audit["error_reason"]) == ("FAILED_PRECONDITION", "REGISTRY_AUTH_FAILED")


def test_image_without_a_matching_host_is_pulled_anonymously_and_refused(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    registry_token: RegistryServer,
    secrets: Secrets,
) -> None:
    # Only another registry has credentials: they are not used here.
    add_registry_host(pull_broker, secrets, "token", registry_token, default=True)
    secrets.add(registry_basic.password)

    error = expect_error(lambda: pull(pull_broker, registry_basic.image))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "REGISTRY_AUTH_FAILED"
    # Debian's dockerd 20.10 refuses an anonymous pull with HTTP 500 before the stream.
    assert "no basic auth credentials" in error.message
    assert_not_present(docker_scratch, registry_basic.image)
    (audit,) = pull_audits(pull_broker)
    assert audit["disclosed"] == "no"
    secrets.assert_absent(pull_broker.text(), "the broker's output")


def test_anonymous_means_anonymous_whatever_the_brokers_docker_config_holds(
    tmp_path: Path,
    docker_engine: DockerEngine,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    secrets: Secrets,
) -> None:
    # The broker's own account has logged in to the registry (`docker login` as the
    # broker's user): the broker must still pull anonymously when no image host
    # matches, or every caller would borrow those credentials unchecked.
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir()
    login = base64.b64encode(
        f"{registry_basic.username}:{secrets.add(registry_basic.password)}".encode()
    ).decode()
    (docker_config / "config.json").write_text(
        json.dumps({"auths": {registry_basic.address: {"auth": login}}})
    )
    broker = BrokerProcess(
        tmp_path / "data",
        env={"DOCKER_HOST": docker_engine.docker_host, "DOCKER_CONFIG": str(docker_config)},
    ).start()
    try:
        error = expect_error(lambda: pull(broker, registry_basic.image))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "REGISTRY_AUTH_FAILED"
        assert "no basic auth credentials" in error.message
        assert_not_present(docker_scratch, registry_basic.image)
        secrets.assert_absent(broker.text(), "the broker's output")
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("path", "words"),
    [("team/tool:no-such-tag", "manifest unknown"), ("team/no-such-repo:1.0", "")],
    ids=["missing-tag", "missing-repository"],
)
def test_missing_image_is_not_found(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    secrets: Secrets,
    path: str,
    words: str,
) -> None:
    add_registry_host(pull_broker, secrets, "private", registry_basic)
    image = f"{registry_basic.address}/{path}"

    error = expect_error(lambda: pull(pull_broker, image))

    assert error.code == grpc.StatusCode.NOT_FOUND, error.message
    assert error.reason == "IMAGE_NOT_FOUND"
    assert words in error.message
    assert_not_present(docker_scratch, image)


@pytest.mark.parametrize("where", ["missing-socket", "closed-port"])
def test_unreachable_engine_is_unavailable(
    tmp_path: Path, closed_port: ClosedPort, where: str
) -> None:
    if where == "missing-socket":
        docker_host = f"unix://{tmp_path}/no-such-dir/docker.sock"
    else:
        docker_host = f"tcp://{closed_port.address}"
    broker = BrokerProcess(tmp_path / "data", env={"DOCKER_HOST": docker_host}).start()
    try:
        started = time.monotonic()
        error = expect_error(lambda: pull(broker, "127.0.0.1:5999/team/tool:1.0"))
        assert time.monotonic() - started < 10
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.reason == "ENGINE_UNAVAILABLE"
        assert "Docker engine cannot be reached" in error.message
        # The broker itself is fine: it answers other calls.
        hosts = broker.image_hosts()
        assert hosts.GetDefaultImageHost(pb.GetDefaultImageHostRequest()).name
    finally:
        broker.stop()


def test_pull_arguments_are_checked_before_the_engine(pull_broker: BrokerProcess) -> None:
    stub = pulls_pb2_grpc.PullServiceStub(pull_broker.channel())

    def first_message(image: str, platform: str = "") -> None:
        request = pulls_pb2.PullImageRequest(image=image, platform=platform)
        next(iter(stub.PullImage(request, timeout=PULL_TIMEOUT)))

    for image, platform, field_name in (
        ("", "", "image"),
        ("Team/Tool", "", "image"),
        ("127.0.0.1:1/a:1", "amd64", "platform"),
    ):
        error = expect_error(lambda: first_message(image, platform))  # noqa: B023
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field_name in error.violations


# -- default host, token registry, TLS registry ------------------------------------------


def test_unqualified_image_pulls_from_the_default_host(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    secrets: Secrets,
) -> None:
    add_registry_host(pull_broker, secrets, "local", registry_basic, default=True)

    pulled = pull(pull_broker, "team/tool:1.0")

    assert pulled.result is not None
    assert pulled.result.image == registry_basic.image
    assert pulled.result.digest == registry_basic.image_digest
    assert pulled.result.image_host == "imageHosts/local"
    assert docker_scratch.run(registry_basic.image) == f"{registry_basic.image_marker}\n"

    # By digest, on a fresh engine state: the same image, pinned as it was asked for.
    docker_scratch.remove_image(registry_basic.image)
    pulled = pull(pull_broker, f"team/tool@{registry_basic.image_digest}")
    assert pulled.result is not None
    assert pulled.result.image == registry_basic.image_by_digest
    assert pulled.result.digest == registry_basic.image_digest
    assert pulled.result.pinned_image == registry_basic.image_by_digest


def test_token_registry_pulls_with_the_hosts_account(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_token: RegistryServer,
    registry_token_server: TokenServer,
    secrets: Secrets,
) -> None:
    add_registry_host(pull_broker, secrets, "tokens", registry_token)
    registry_token_server.clear_requests()

    pulled = pull(pull_broker, registry_token.image)

    assert pulled.result is not None
    assert pulled.result.digest == registry_token.image_digest
    assert pulled.result.image_host == "imageHosts/tokens"
    assert docker_scratch.run(registry_token.image) == f"{registry_token.image_marker}\n"
    granted = [r for r in registry_token_server.requests if r.outcome == "granted"]
    assert granted
    assert {r.username for r in granted} == {registry_token.username}
    secrets.assert_absent(pull_broker.text(), "the broker's output")


def test_tls_registry_trusted_by_the_engine_pulls(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_tls_netns: RegistryServer,
    secrets: Secrets,
) -> None:
    # The engine trusts the registry's CA through certs.d; the broker only passes
    # credentials (it is started without --registry-ca-file).
    add_registry_host(pull_broker, secrets, "tls", registry_tls_netns)

    pulled = pull(pull_broker, registry_tls_netns.image)

    assert pulled.result is not None
    assert pulled.result.digest == registry_tls_netns.image_digest
    assert pulled.result.pinned_image == registry_tls_netns.image_by_digest
    assert docker_scratch.run(registry_tls_netns.image) == f"{registry_tls_netns.image_marker}\n"

    # The same registry under a name the engine has no CA for: the engine's x509 error.
    untrusted = registry_tls_netns.aliases[0]
    add_host(
        pull_broker,
        "tls-untrusted",
        f"https://{untrusted}",
        registry_tls_netns.username,
        secrets.add(registry_tls_netns.password),
    )
    image = f"{untrusted}/{registry_tls_netns.repository}:{registry_tls_netns.tag}"
    error = expect_error(lambda: pull(pull_broker, image))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "x509: certificate signed by unknown authority" in error.message
    secrets.assert_absent(pull_broker.text(), "the broker's output")


# -- credentials stay with their registry -------------------------------------------------


def test_credentials_never_reach_another_registry(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    registry_basic: RegistryServer,
    recording_registry: RecordingRegistry,
    secrets: Secrets,
) -> None:
    # Credentials exist for registry_basic (the default host, too); none for the recorder.
    add_registry_host(pull_broker, secrets, "private", registry_basic, default=True)
    image = f"{recording_registry.address}/team/tool:1.0"

    resolver = credentials_pb2_grpc.CredentialServiceStub(pull_broker.channel())
    answer = resolver.ResolveCredentials(credentials_pb2.ResolveCredentialsRequest(image=image))
    assert answer.anonymous
    assert (answer.image_host, answer.username, answer.registry_auth) == ("", "", "")
    secrets.assert_absent(answer.secret, "the resolution")

    error = expect_error(lambda: pull(pull_broker, image))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "REGISTRY_AUTH_FAILED"
    # The engine did ask the recorder, and sent it no credentials at all.
    assert any(r.path == "/v2/" for r in recording_registry.requests)
    if recording_registry.authorizations:  # never print them: they may hold the password
        pytest.fail(f"{len(recording_registry.authorizations)} request(s) carried credentials")
    assert_not_present(docker_scratch, image)


# -- cancelling ---------------------------------------------------------------------------


class ThrottlingProxy:
    """127.0.0.1:<port> in front of a registry; answers trickle back at `rate` bytes/s.

    `rate = 0` stops forwarding answers until it changes; `rate = None` forwards at
    full speed. `bytes_down` counts what reached the client; `open_connections`
    those the client has not closed. A connection that starts with a TLS
    ClientHello is closed at once (the engine tries HTTPS first on 127.0.0.0/8).
    """

    TICK = 0.05

    def __init__(self, upstream: str, rate: int | None) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self.rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(self.TICK)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.bytes_down = 0
        self.open_connections = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> ThrottlingProxy:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        with client:
            if reject_tls_handshake(client):
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                return
            with upstream:
                with self._lock:
                    self._sockets += [client, upstream]
                    self.open_connections += 1
                try:
                    self._spawn(self._forward_requests, client, upstream)
                    self._forward_answers(upstream, client)
                finally:
                    for sock in (client, upstream):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                    with self._lock:
                        self.open_connections -= 1

    def _forward_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                upstream.sendall(data)
        # The client went away (or sent everything): end the upstream side too.
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)

    def _forward_answers(self, upstream: socket.socket, client: socket.socket) -> None:
        upstream.settimeout(None)
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                rate = self.rate
                if rate == 0:
                    time.sleep(self.TICK)
                    continue
                size = 65536 if rate is None else max(1, int(rate * self.TICK))
                data = upstream.recv(size)
                if not data:
                    return
                client.sendall(data)
                with self._lock:
                    self.bytes_down += len(data)
                if rate is not None:
                    time.sleep(self.TICK)


@dataclass(frozen=True)
class SlowImage:
    repository: str
    digest: str
    #: The layer's size: more than a cancelled pull may download.
    size: int


@pytest.fixture(scope="module")
def slow_image(docker_engine: DockerEngine, registry_basic: RegistryServer) -> SlowImage:
    """An image on registry_basic with one layer of 4 MB of random bytes: no pull finds
    it cached, and at SLOW_RATE it takes about 16 seconds."""
    size = 4_000_000
    buffer = io.BytesIO(rootfs_tar())
    with tarfile.open(fileobj=buffer, mode="a") as tar:
        info = tarfile.TarInfo("random.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    repository = "team/slow"
    reference = f"{registry_basic.address}/{repository}:1.0"
    docker_engine.import_image(reference, "slow-marker", rootfs=buffer.getvalue())
    try:
        digest = docker_engine.push(reference, registry_basic.auth_config())
    finally:
        docker_engine.remove_image(reference)
    return SlowImage(repository, digest, size)


@pytest.fixture
def slow_proxy(
    pull_broker: BrokerProcess, registry_basic: RegistryServer, secrets: Secrets
) -> Iterator[ThrottlingProxy]:
    """A throttling proxy in front of registry_basic, with a broker host for it."""
    proxy = ThrottlingProxy(registry_basic.address, rate=SLOW_RATE).start()
    try:
        add_host(
            pull_broker,
            "slow",
            f"http://{proxy.address}",
            registry_basic.username,
            secrets.add(registry_basic.password),
        )
        yield proxy
    finally:
        proxy.stop()


def start_pull_until_downloading(
    broker: BrokerProcess, image: str
) -> grpc.CallIterator[pulls_pb2.PullImageResponse]:
    """A PullImage call, read until the engine reports bytes of the layer coming in."""
    stub = pulls_pb2_grpc.PullServiceStub(broker.channel())
    call = stub.PullImage(pulls_pb2.PullImageRequest(image=image), timeout=PULL_TIMEOUT)
    seen: list[str] = []
    for message in call:
        seen.append(message.progress.status)
        if message.progress.status == "Downloading" and message.progress.current_bytes:
            return call
    raise AssertionError(f"the pull ended before any layer was downloading: {seen}")


def cancel(call: grpc.CallIterator[pulls_pb2.PullImageResponse]) -> None:
    call.cancel()  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.CANCELLED


def test_cancelled_pull_stops_on_the_engine(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    slow_image: SlowImage,
    slow_proxy: ThrottlingProxy,
) -> None:
    image = f"{slow_proxy.address}/{slow_image.repository}:1.0"
    call = start_pull_until_downloading(pull_broker, image)
    cancelled_at = time.monotonic()
    cancel(call)

    # The engine hangs up on the registry well before the layer is through (16 s
    # at this rate), and nothing more comes down.
    wait_until(lambda: slow_proxy.open_connections == 0, "the engine to stop downloading")
    assert time.monotonic() - cancelled_at < 8
    settled = slow_proxy.bytes_down
    time.sleep(0.5)
    assert slow_proxy.bytes_down == settled
    assert settled < slow_image.size
    assert_not_present(docker_scratch, image)
    wait_until(lambda: '"code": "CANCELLED"' in pull_broker.text(), "the audit line")

    # The broker stays healthy, and the engine takes the same image at full speed.
    with grpc.insecure_channel(pull_broker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    slow_proxy.rate = None
    pulled = pull(pull_broker, image)
    assert pulled.result is not None
    assert pulled.result.digest == slow_image.digest
    assert docker_scratch.run(image) == "slow-marker\n"


def test_cancelled_pull_ends_at_once_while_the_registry_stalls(
    pull_broker: BrokerProcess,
    docker_scratch: DockerEngine,
    slow_image: SlowImage,
    slow_proxy: ThrottlingProxy,
) -> None:
    image = f"{slow_proxy.address}/{slow_image.repository}:1.0"
    call = start_pull_until_downloading(pull_broker, image)
    slow_proxy.rate = 0  # the registry stalls mid-layer: the engine has nothing to report
    time.sleep(1.0)  # what was already on its way is reported, then silence
    cancel(call)
    try:
        # The broker's side of the call ends (its audit line is written when the
        # handler returns), although the engine sends nothing.
        wait_until(
            lambda: '"code": "CANCELLED"' in pull_broker.text(),
            "the broker to end the cancelled pull",
            timeout=3,
        )
    finally:
        # The registry moves again; whatever still waited on it sees the call is gone.
        slow_proxy.rate = None
        wait_until(lambda: '"code": "CANCELLED"' in pull_broker.text(), "the pull to end")
    # The engine, whose client hung up, gives the pull up (dockerd only notices once its
    # stalled read returns: that much is the engine's, not the broker's).
    wait_until(lambda: slow_proxy.open_connections == 0, "the engine to stop downloading")
    assert_not_present(docker_scratch, image)
