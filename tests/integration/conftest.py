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

Swarm (`tests/support/swarm_bed.py`; section at the end of this file):

- `swarm_bed` (session) -> `SwarmBed`: a manager and a worker dockerd in two network
  namespaces joined by a veth (198.18.0.1 / 198.18.0.2), the registry at
  198.18.0.1:5000 in the manager's namespace, the private image pushed.
  `manager`, `worker`, `nodes`, `node(id)`; `docker_host` / `manager_socket` (the
  broker's DOCKER_HOST); `registry` (`RegistryServer`), `registry_address`,
  `username`, `password`, `auth_config()`, `registry_auth()` (the header);
  `image` (`PrivateImage`: `reference`, `by_digest`, `pinned`, `digest`, `marker`),
  `push_private_image()`, `manager_only_registry()` (127.0.0.1:5001, unreachable
  from the worker); `create_service(spec, registry_auth)`, `service_spec()`
  (module function), `services()`, `tasks()`, `wait_for_terminal_tasks()`,
  `remove_services()`, `task_containers()`, `node_states()`, `image_present()`,
  `containers_by_node()`. Each `SwarmNode`: `node_id`, `address`, `socket_path`,
  `docker_host`, `api` / `client` (the bed's), `api_client()` / `docker_client()`
  (new ones), `has_image()`, `containers()`, `evidence_of_run(image, since)`.
- `swarm_single` (session) -> `SwarmBed`: the manager alone, with its own registry.
- `swarm_scratch`, `swarm_single_scratch` (function): the same beds; after the test,
  a service left on the manager fails the test (it is removed first), and the
  images and containers the test added on any node are removed.

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
from tests.support.swarm_bed import SwarmBed


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


# -- Swarm ----------------------------------------------------------------------------
# Fixtures of the real multi-node Swarm test bed (tests/support/swarm_bed.py).


@pytest.fixture(scope="session")
def swarm_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmBed]:
    """Manager + worker + registry, each dockerd in its own network namespace."""
    bed = SwarmBed.create(tmp_path_factory.mktemp("swarm-bed"), nodes=2)
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture(scope="session")
def swarm_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmBed]:
    """The single-node case: a manager (and its registry) alone in its namespace."""
    bed = SwarmBed.create(tmp_path_factory.mktemp("swarm-single"), nodes=1)
    try:
        yield bed
    finally:
        bed.close()


def _swarm_scratch(bed: SwarmBed) -> Iterator[SwarmBed]:
    """Yield `bed`; then remove what the test left, and fail it when a service was left.

    A service left behind would make the next test's tasks and node states
    ambiguous, and means the code under test did not clean up after itself.
    """
    images = {node.node_id: node.image_ids() for node in bed.nodes}
    containers = {node.node_id: {c["Id"] for c in node.containers()} for node in bed.nodes}
    yield bed
    left = bed.remove_services()
    for node in bed.nodes:
        for container in node.containers():
            if container["Id"] not in containers[node.node_id]:
                node.remove_container(container["Id"])
        for image_id in node.image_ids() - images[node.node_id]:
            node.remove_image(image_id)
    if left:
        pytest.fail(f"services left on the swarm manager (now removed): {left}")


@pytest.fixture
def swarm_scratch(swarm_bed: SwarmBed) -> Iterator[SwarmBed]:
    """`swarm_bed`; no service may be left after the test, added images are removed."""
    yield from _swarm_scratch(swarm_bed)


@pytest.fixture
def swarm_single_scratch(swarm_single: SwarmBed) -> Iterator[SwarmBed]:
    """`swarm_single`; no service may be left after the test, added images are removed."""
    yield from _swarm_scratch(swarm_single)


# -- Kubernetes -----------------------------------------------------------------------
# The Kubernetes API server emulator (tests/support/k8s_emulator.py): a fresh one per
# test, reached through a kubeconfig by the official client. Imported here, not at the
# top, so that this section stays self-contained.

from pathlib import Path  # noqa: E402

from tests.support.k8s_emulator import K8sCluster, K8sEmulator  # noqa: E402


@pytest.fixture
def k8s_cluster(tmp_path: Path) -> Iterator[K8sCluster]:
    """A fresh K8sEmulator on 127.0.0.1 and a kubeconfig (context "k8s-emulator") for it.

    `k8s_cluster.emulator` is the emulator (test controls: create_namespace,
    get_object/put_object/mutate_object, forbid_namespace, inject, before_write,
    requests, settle), `.kubeconfig` the kubeconfig path, `.context` its context,
    `.core_v1()` a CoreV1Api built from it (`.api_client()` the ApiClient). Both
    are closed after the test; an internal emulator error fails it.
    """
    emulator = K8sEmulator().start()
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig", context_name="k8s-emulator")
    cluster = K8sCluster(emulator, kubeconfig, "k8s-emulator")
    try:
        yield cluster
    finally:
        cluster.close()
        emulator.stop()
    assert emulator.server_errors == []
