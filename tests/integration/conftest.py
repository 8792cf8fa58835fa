"""The real Docker test bed: one dockerd and real registries per session.

Session fixtures (each starts on first use, is shared by every test after that,
and is stopped at the end of the session, also when a test fails):

- `docker_engine` -> `DockerEngine`: `client` (docker-py `DockerClient`), `api`,
  `docker_host` (`unix://…`), `socket_path`, `certs_d`, `log_path`, `pid`;
  `pull()`, `pull_with_header()`, `push()`, `run()`, `import_image()`,
  `remove_image()`, `trust_ca()`, `distrust()`.
- `registry_ca` -> `RegistryCA` (`cert`: the CA file every TLS registry chains to).
- `registry_basic_bare`, `registry_tls_bare`, `registry_token_bare` -> running
  `RegistryServer`s on 127.0.0.1 that need no engine (for HTTP-level clients):
  `address` (host:port), `host`, `port`, `url`, `scheme`, `username`, `password`,
  `ca_path` (TLS only, else None), `auth_config()`, `registry_auth()`, `get()`,
  `log_path`; the token one also `token_server`.
- `registry_basic`, `registry_tls`, `registry_token`: the same servers once the
  private image is pushed: `image` (`<address>/team/tool:1.0`), `image_digest`,
  `image_by_digest`, `image_marker` (what `docker run` prints), `repository`, `tag`.
- `registry_tls_netns` -> `RegistryServer` (image pushed) at 198.18.x.2:5000 in a
  network namespace, trusted by the engine through certs.d; `aliases[0]`
  (198.18.x.3:5000) is the same registry without that trust.
- `registry_token_server` -> `TokenServer` (`realm`, `service`, `issuer`,
  `rootcertbundle`, `requests`, `clear_requests()`, `add_user()`).
- `netns_network` -> `TestNetwork` (`guest_addresses`, `host_address`, `subnet`).

Function fixtures: `docker_scratch` (the engine; removes the images and containers
the test added), `recording_registry`, `not_a_registry`, `closed_port`, `silent_port`.

A missing prerequisite fails the fixture with what to install; nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.docker_engine import DockerEngine
from tests.support.netns_link import TestNetwork
from tests.support.registry_http_fakes import (
    ClosedPort,
    NotARegistry,
    RecordingRegistry,
    SilentPort,
)
from tests.support.registry_servers import RegistryCA, RegistryServer
from tests.support.registry_token_server import TokenServer


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    engine = DockerEngine(tmp_path_factory.mktemp("docker-engine"))
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def docker_scratch(docker_engine: DockerEngine) -> Iterator[DockerEngine]:
    """The session engine; images and containers the test adds are removed after it."""
    with docker_engine.scratch() as engine:
        yield engine


@pytest.fixture(scope="session")
def registry_ca(tmp_path_factory: pytest.TempPathFactory) -> RegistryCA:
    return RegistryCA("registry", tmp_path_factory.mktemp("registry-ca"))


def _running(server: RegistryServer) -> Iterator[RegistryServer]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry_basic_bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Plain HTTP on 127.0.0.1, bcrypt htpasswd; no engine needed, no image pushed by it."""
    yield from _running(RegistryServer("basic", tmp_path_factory.mktemp("registry-basic")))


@pytest.fixture(scope="session")
def registry_tls_bare(
    registry_ca: RegistryCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """HTTPS on 127.0.0.1 (certificate for 127.0.0.1/localhost from `registry_ca`), htpasswd.

    For HTTPS clients that verify with `ca_path`. The engine treats 127.0.0.0/8 as
    insecure (no verification; an anonymous pull even reports the reset of its
    plain-HTTP fallback): prove CA trust through the engine with `registry_tls_netns`.
    """
    server = RegistryServer(
        "tls",
        tmp_path_factory.mktemp("registry-tls"),
        certificate=registry_ca.server_for("registry-tls", ["127.0.0.1"]),
        ca_path=registry_ca.cert,
    )
    yield from _running(server)


@pytest.fixture(scope="session")
def registry_token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path_factory.mktemp("registry-token-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry_token_bare(
    registry_token_server: TokenServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """Plain HTTP on 127.0.0.1 with token authentication against `registry_token_server`."""
    server = RegistryServer(
        "token",
        tmp_path_factory.mktemp("registry-token"),
        auth="token",
        token_server=registry_token_server,
    )
    yield from _running(server)


@pytest.fixture(scope="session")
def registry_basic(
    registry_basic_bare: RegistryServer, docker_engine: DockerEngine
) -> RegistryServer:
    """`registry_basic_bare` with the private image pushed (`image`, `image_digest`)."""
    registry_basic_bare.publish_image(docker_engine)
    return registry_basic_bare


@pytest.fixture(scope="session")
def registry_tls(registry_tls_bare: RegistryServer, docker_engine: DockerEngine) -> RegistryServer:
    """`registry_tls_bare` with the private image pushed (`image`, `image_digest`)."""
    registry_tls_bare.publish_image(docker_engine)
    return registry_tls_bare


@pytest.fixture(scope="session")
def registry_token(
    registry_token_bare: RegistryServer, docker_engine: DockerEngine
) -> RegistryServer:
    """`registry_token_bare` with the private image pushed (`image`, `image_digest`)."""
    registry_token_bare.publish_image(docker_engine)
    return registry_token_bare


@pytest.fixture(scope="session")
def netns_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestNetwork]:
    network: TestNetwork | None = None
    try:
        network = TestNetwork.create(tmp_path_factory.mktemp("netns"), guest_addresses=2)
        yield network
    finally:
        if network is not None:
            network.close()


@pytest.fixture(scope="session")
def registry_tls_netns(
    docker_engine: DockerEngine,
    registry_ca: RegistryCA,
    netns_network: TestNetwork,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RegistryServer]:
    """HTTPS + htpasswd inside `netns_network`, at `address` (198.18.x.2:5000).

    The engine trusts `registry_ca` for `address` only (certs.d/<address>/ca.crt in its
    private /etc/docker); `aliases[0]` (198.18.x.3:5000) is the same registry
    without that trust.
    """
    server = RegistryServer(
        "tls-netns",
        tmp_path_factory.mktemp("registry-tls-netns"),
        certificate=registry_ca.server_for("registry-tls-netns", netns_network.guest_addresses),
        ca_path=registry_ca.cert,
        network=netns_network,
    )
    try:
        server.start()
        docker_engine.trust_ca(server.address, registry_ca.cert)
        server.publish_image(docker_engine)
        yield server
    finally:
        server.stop()
        if server.listener is not None:
            docker_engine.distrust(server.address)


@pytest.fixture
def recording_registry() -> Iterator[RecordingRegistry]:
    server = RecordingRegistry().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def not_a_registry() -> Iterator[NotARegistry]:
    server = NotARegistry().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def closed_port() -> Iterator[ClosedPort]:
    port = ClosedPort()
    try:
        yield port
    finally:
        port.close()


@pytest.fixture
def silent_port() -> Iterator[SilentPort]:
    port = SilentPort()
    try:
        yield port
    finally:
        port.close()
