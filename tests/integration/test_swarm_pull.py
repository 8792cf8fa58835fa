"""PullImage on a real two-node Docker Swarm, over real gRPC, against a real broker process.

The broker's DOCKER_HOST is the Swarm test bed's manager (`tests/support/swarm_bed.py`):
every pull goes broker -> manager dockerd -> a pre-pull service -> each node's dockerd ->
the bed's registry (htpasswd: anonymous pulls are refused). A worker only ever gets
credentials through the service spec, so an image on the worker proves that the broker's
X-Registry-Auth travelled; each such test shows first that without it the worker is
refused. One broker serves the whole module; every test adds image hosts of its own
(a repository prefix of its own on the registry) and pushes a fresh image, and the
`swarm_scratch` fixture fails any test that leaves a service behind. Registry passwords,
access tokens and the admin token are registered with `Secrets`: they must never show
up in any output.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets as random
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.auth
import grpc
import pytest
from google.protobuf import field_mask_pb2

from broker.core.swarm import NODE_PULL_HINT
from broker.v1 import image_hosts_pb2 as pb
from broker.v1 import pulls_pb2, pulls_pb2_grpc
from tests.support.auth_helpers import Secrets, audit_records
from tests.support.broker_process import BrokerProcess
from tests.support.docker_processes import wait_until
from tests.support.registry_servers import RegistryServer
from tests.support.status import expect_error
from tests.support.swarm_bed import (
    MANAGER_ADDRESS,
    REGISTRY_PORT,
    IsolatedNamespace,
    PrivateImage,
    SwarmBed,
    SwarmNode,
    service_spec,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
CREDBROKER = Path(sysconfig.get_path("scripts")) / "credbroker"
PULL_TIMEOUT = 60.0
RUN_TIMEOUT = 90.0
#: What the broker names its pre-pull services, and the command they are given.
PREPULL_PREFIX = "credbroker-prepull-"
NEVER_RUNS = "/credbroker-prepull-never-runs"
#: The relays of the cancellation tests listen on 127.0.0.1:RELAY_PORT in each node's own
#: namespace: one image reference, a different registry behind it on each node.
RELAY_PORT = 5002
#: How long a cancelled or expired pull may take to remove its service. A stalled
#: worker would end its pull by itself only after dockerd's TLS handshake timeout (10 s).
CLEANUP_BOUND = 6.0
PULLED = pulls_pb2.NODE_PULL_STATE_PULLED
ALREADY_PRESENT = pulls_pb2.NODE_PULL_STATE_ALREADY_PRESENT
FAILED = pulls_pb2.NODE_PULL_STATE_FAILED
SWARM = pulls_pb2.PULL_BACKEND_SWARM


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm_broker(
    swarm_bed: SwarmBed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """One broker for the module, its engine the bed's manager."""
    broker = BrokerProcess(
        tmp_path_factory.mktemp("swarm-pull-broker") / "data",
        env={"DOCKER_HOST": swarm_bed.docker_host},
    ).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def secrets(swarm_broker: BrokerProcess) -> Iterator[Secrets]:
    """Secrets of the test; after it, the broker's whole output must hold none of them."""
    found = Secrets()
    found.add(swarm_broker.admin_token())
    yield found
    found.assert_absent(swarm_broker.text(), "the broker's output")


@dataclass(frozen=True)
class HostedImage:
    """A fresh image pushed for one test, and the image host the broker has for it."""

    #: As the broker is asked for it (its registry may be a relay of the pushed one).
    image: PrivateImage
    #: `imageHosts/<id>`: a host of its own, for this image's repository prefix only.
    host: str

    @property
    def reference(self) -> str:
        return self.image.reference

    @property
    def by_digest(self) -> str:
        return self.image.by_digest


def hosted_image(
    bed: SwarmBed,
    broker: BrokerProcess,
    secrets: Secrets,
    *,
    registry: RegistryServer | None = None,
    address: str | None = None,
    password: str | None = None,
) -> HostedImage:
    """Push a fresh image (unique marker, so a digest no node has) under a repository prefix
    of its own, and create an image host for that prefix with the registry's user and its
    password (or `password`). `address`: the registry as the broker is asked for it."""
    server = registry or bed.registry
    assert server is not None
    prefix = f"t{random.token_hex(5)}"
    pushed = bed.push_private_image(repository=f"{prefix}/app", registry=server)
    image = PrivateImage(
        address or pushed.registry, pushed.repository, pushed.tag, pushed.digest, pushed.marker
    )
    token = secrets.add(server.password if password is None else password)
    secrets.add(server.password)
    host = broker.image_hosts().CreateImageHost(
        pb.CreateImageHostRequest(
            image_host_id=f"swarm-{prefix}",
            image_host=pb.ImageHost(
                url=f"http://{image.registry}/{prefix}",
                username=server.username,
                access_token=token,
            ),
        ),
        timeout=10,
    )
    for node in bed.nodes:
        assert not node.has_image(image.by_digest)
    return HostedImage(image, host.name)


@dataclass
class SwarmPulled:
    nodes: list[pulls_pb2.NodePull]
    result: pulls_pb2.PullResult

    def states(self) -> dict[str, int]:
        """node id -> the state its `node` event reported (each node exactly once)."""
        ids = [n.node_id for n in self.nodes]
        assert len(ids) == len(set(ids)), f"a node was reported twice: {ids}"
        return {n.node_id: n.state for n in self.nodes}


def pull_stub(broker: BrokerProcess) -> pulls_pb2_grpc.PullServiceStub:
    return pulls_pb2_grpc.PullServiceStub(broker.channel())


def swarm_pull(broker: BrokerProcess, image: str, **options: Any) -> SwarmPulled:
    """PullImage to the end: `node` events, then the result, last and only once."""
    request = pulls_pb2.PullImageRequest(image=image, **options)
    nodes: list[pulls_pb2.NodePull] = []
    result: pulls_pb2.PullResult | None = None
    for message in pull_stub(broker).PullImage(request, timeout=PULL_TIMEOUT):
        assert result is None, "a message came after the result"
        if message.HasField("result"):
            result = message.result
        else:
            assert message.HasField("node"), f"not a node event: {message}"
            nodes.append(message.node)
    assert result is not None, "the stream ended without a result"
    return SwarmPulled(nodes, result)


def state_names(states: dict[str, int]) -> dict[str, str]:
    return {k: pulls_pb2.NodePullState.Name(v) for k, v in states.items()}


def prepull_services(bed: SwarmBed) -> list[str]:
    return [
        str(s["Spec"]["Name"])
        for s in bed.services()
        if str(s["Spec"]["Name"]).startswith(PREPULL_PREFIX)
    ]


def service_events(bed: SwarmBed, since: float) -> list[tuple[str, str]]:
    """(action, service name) of every service event on the manager since `since`."""
    events = bed.manager.api.events(
        since=since, until=time.time(), filters={"type": "service"}, decode=True
    )
    return [
        (str(e.get("Action", "")), str(e.get("Actor", {}).get("Attributes", {}).get("name", "")))
        for e in events
    ]


def assert_one_prepull_came_and_went(bed: SwarmBed, since: float) -> str:
    """The pull created exactly one pre-pull service and removed it; returns its name."""
    events = service_events(bed, since)
    names = {name for _, name in events}
    assert len(names) == 1, events
    (name,) = names
    assert name.startswith(PREPULL_PREFIX)
    assert [action for action, _ in events if action in ("create", "remove")] == [
        "create",
        "remove",
    ], events
    assert prepull_services(bed) == []
    return name


def hostnames(bed: SwarmBed) -> dict[str, str]:
    return {
        node.node_id: str(bed.manager.api.inspect_node(node.node_id)["Description"]["Hostname"])
        for node in bed.nodes
    }


def wait_for_no_prepull(bed: SwarmBed, timeout: float, what: str) -> float:
    """Wait (bounded) until the manager lists no pre-pull service; returns how long it took."""
    started = time.monotonic()
    wait_until(
        lambda: True if prepull_services(bed) == [] else None,
        timeout=timeout,
        what=what,
    )
    return time.monotonic() - started


def wait_for_no_task_containers(bed: SwarmBed, timeout: float = 15.0) -> None:
    """Every swarm task container on every node belongs to a live service (none left over)."""

    def clean() -> bool | None:
        live = {str(s["ID"]) for s in bed.services()}
        left = [c for c in bed.task_containers() if c[2] not in live]
        return True if not left else None

    wait_until(clean, timeout=timeout, what="the pre-pull's task containers to go")


def control_without_auth_is_rejected(bed: SwarmBed, image: PrivateImage) -> None:
    """The pre-pull's own service shape, sent without X-Registry-Auth, on the worker: the
    worker is refused (so the pull that follows can only work with the broker's auth)."""
    assert docker.auth.resolve_authconfig(docker.auth.load_config(), image.registry) is None
    worker = bed.worker
    spec = service_spec(
        f"control-{random.token_hex(3)}",
        image.by_digest,
        command=[NEVER_RUNS],
        constraints=[f"node.id=={worker.node_id}"],
    )
    service_id = bed.create_service(spec, registry_auth=None)
    try:
        tasks = bed.wait_for_terminal_tasks(service_id, [worker])
        status = tasks[worker.node_id]["Status"]
        assert (status["State"], status.get("Err", "")) == (
            "rejected",
            f"No such image: {image.by_digest}",
        )
        assert not worker.has_image(image.by_digest)
    finally:
        bed.manager.api.remove_service(service_id)
    wait_for_no_task_containers(bed)


def created_containers_of(node: SwarmNode, image: PrivateImage, since: float) -> list[str]:
    """Ids of the containers of `image` created on `node` since `since`."""
    name = f"{image.registry}/{image.repository}"
    found = []
    for event in node.container_events(since, action="create"):
        attributes = event.get("Actor", {}).get("Attributes", {})
        if str(attributes.get("image", "")).startswith((f"{name}:", f"{name}@")):
            found.append(str(event.get("Actor", {}).get("ID", "")))
    return found


def pull_audits(broker: BrokerProcess, image: str, count: int) -> list[dict[str, Any]]:
    """The PullImage audit records of `image` (bounded wait until `count` are there)."""

    def records() -> list[dict[str, Any]] | None:
        found = [
            r
            for r in audit_records(broker.text())
            if r.get("audit") == "PullImage" and r.get("image") == image
        ]
        return found if len(found) >= count else None

    return wait_until(records, timeout=10.0, what=f"{count} PullImage audit line(s) of {image}")


# -- 1, 2: a private image reaches the worker ----------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [pulls_pb2.PULL_BACKEND_SWARM, pulls_pb2.PULL_BACKEND_UNSPECIFIED],
    ids=["swarm", "auto-picks-swarm"],
)
def test_private_image_reaches_the_worker_through_the_broker(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets, backend: int
) -> None:
    bed = swarm_scratch
    hosted = hosted_image(bed, swarm_broker, secrets)
    image = hosted.image
    control_without_auth_is_rejected(bed, image)

    pulled = swarm_pull(swarm_broker, image.reference, backend=backend)

    every_node = {node.node_id for node in bed.nodes}
    assert len(every_node) == 2
    assert state_names(pulled.states()) == dict.fromkeys(every_node, "NODE_PULL_STATE_PULLED")
    assert all(n.reason == "" for n in pulled.nodes)
    names = hostnames(bed)
    assert {n.node_id: n.hostname for n in pulled.nodes} == names
    result = pulled.result
    assert result.digest == image.digest
    assert result.pinned_image == f"{image.registry}/{image.repository}@{image.digest}"
    assert result.image == image.reference
    assert result.image_host == hosted.host
    assert result.backend == SWARM
    assert result.registry_auth == ""
    assert {(n.node_id, n.hostname, n.state) for n in result.nodes} == {
        (n.node_id, n.hostname, n.state) for n in pulled.nodes
    }
    assert bed.image_present(bed.worker.node_id, image.by_digest)
    assert bed.image_present(bed.manager.node_id, image.by_digest)
    assert prepull_services(bed) == []


def test_prepull_never_runs_the_image_and_removes_its_service(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> None:
    bed = swarm_scratch
    image = hosted_image(bed, swarm_broker, secrets).image
    since = time.time()

    pulled = swarm_pull(swarm_broker, image.reference, backend=SWARM)

    assert set(pulled.states().values()) == {PULLED}
    # No pre-pull service is left, right after the call; it did exist meanwhile.
    assert prepull_services(bed) == []
    assert_one_prepull_came_and_went(bed, since)
    # Each node created a container of the image (the check below is not vacuous)...
    for node in bed.nodes:
        assert created_containers_of(node, image, since), node
    # ...yet none started: no start event, no marker in any log, on any node.
    assert [line for node in bed.nodes for line in node.evidence_of_run(image, since)] == []
    # And the swarm removes the pre-pull's task containers everywhere.
    wait_for_no_task_containers(bed)


# -- 3: one node cannot reach the registry -------------------------------------------------


def test_a_node_that_cannot_reach_the_registry_fails_alone(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> None:
    bed = swarm_scratch
    local = bed.manager_only_registry()  # 127.0.0.1:5001 in the manager's namespace
    hosted = hosted_image(bed, swarm_broker, secrets, registry=local)
    image = hosted.image
    assert image.registry == local.address

    pulled = swarm_pull(swarm_broker, image.reference, backend=SWARM)

    manager, worker = bed.manager.node_id, bed.worker.node_id
    states = pulled.states()
    assert states[manager] in (PULLED, ALREADY_PRESENT)
    assert states[worker] == FAILED
    (failed,) = [n for n in pulled.nodes if n.node_id == worker]
    assert "No such image" in failed.reason
    assert failed.reason.endswith(NODE_PULL_HINT)
    assert image.by_digest in failed.reason
    (manager_event,) = [n for n in pulled.nodes if n.node_id == manager]
    assert manager_event.reason == ""
    # A failed node does not fail the call: the result has every node's outcome.
    result = pulled.result
    assert result.digest == image.digest
    assert result.pinned_image == image.by_digest
    assert result.image_host == hosted.host
    assert {n.node_id: (n.state, n.reason) for n in result.nodes} == {
        n.node_id: (n.state, n.reason) for n in pulled.nodes
    }
    assert bed.image_present(manager, image.by_digest)
    assert not bed.image_present(worker, image.by_digest)
    assert prepull_services(bed) == []


# -- 4: a wrong token ----------------------------------------------------------------------


def test_wrong_token_fails_on_the_manager_before_any_node(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> None:
    bed = swarm_scratch
    wrong = f"wrong-{random.token_urlsafe(16)}"
    image = hosted_image(bed, swarm_broker, secrets, password=wrong).image
    since = time.time()
    received: list[pulls_pb2.PullImageResponse] = []

    def call() -> None:
        request = pulls_pb2.PullImageRequest(image=image.reference, backend=SWARM)
        for message in pull_stub(swarm_broker).PullImage(request, timeout=PULL_TIMEOUT):
            received.append(message)

    error = expect_error(call)

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "REGISTRY_AUTH_FAILED"
    assert "unauthorized" in error.message
    assert received == []  # not one node event
    secrets.assert_absent(error.message, "the error message")
    # The digest is resolved on the manager first: no service was ever created.
    assert [e for e in service_events(bed, since) if e[0] == "create"] == []
    assert prepull_services(bed) == []
    for node in bed.nodes:
        assert not node.has_image(image.by_digest)
    (audit,) = pull_audits(swarm_broker, image.reference, 1)
    assert (audit["code"], audit["error_reason"]) == ("FAILED_PRECONDITION", "REGISTRY_AUTH_FAILED")


# -- 5: cancellation and deadlines ---------------------------------------------------------


class NamespaceRelay:
    """`127.0.0.1:RELAY_PORT` inside one node's network namespace.

    Forwarding, each connection is relayed at full speed to the bed's registry
    (198.18.0.1:5000, the upstream socket also opened inside the namespace); stalled,
    connections are accepted and never answered: a registry that hangs. The engines
    treat 127.0.0.0/8 as insecure (HTTPS first, then plain HTTP), so a relay needs no
    `--insecure-registry` of its own.
    """

    TICK = 0.05

    def __init__(self, namespace: IsolatedNamespace, *, stalled: bool) -> None:
        self._namespace = namespace
        self._stalled = stalled
        self._listener = namespace.create_server(("127.0.0.1", RELAY_PORT))
        self._listener.settimeout(self.TICK)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.accepted = 0

    def start(self) -> NamespaceRelay:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        for sock in sockets:
            sock.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name="relay", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _keep(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._stop.is_set():
                sock.close()
                return False
            self._sockets.append(sock)
            return True

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if not self._keep(client):
                return
            self.accepted += 1
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        if self._stalled:
            with contextlib.suppress(OSError):
                while client.recv(65536):
                    pass
            return
        try:
            upstream = self._namespace.create_connection((MANAGER_ADDRESS, REGISTRY_PORT), 5.0)
        except OSError:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            return
        upstream.settimeout(None)
        if not self._keep(upstream):
            return
        self._spawn(self._pipe, client, upstream)
        self._pipe(upstream, client)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


@dataclass(frozen=True)
class StalledWorker:
    hosted: HostedImage
    worker_relay: NamespaceRelay


@pytest.fixture
def stalled_worker(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> Iterator[StalledWorker]:
    """A fresh image at 127.0.0.1:5002: the manager's own 127.0.0.1:5002 relays to the
    registry, the worker's hangs. The manager resolves the digest and pulls at once; the
    worker's pull stays in progress (its task `preparing`) until something stops it."""
    bed = swarm_scratch
    manager_relay = NamespaceRelay(bed.manager.namespace, stalled=False).start()
    worker_relay: NamespaceRelay | None = None
    try:
        worker_relay = NamespaceRelay(bed.worker.namespace, stalled=True).start()
        hosted = hosted_image(bed, swarm_broker, secrets, address=f"127.0.0.1:{RELAY_PORT}")
        yield StalledWorker(hosted, worker_relay)
    finally:
        if worker_relay is not None:
            worker_relay.stop()
        manager_relay.stop()


def worker_task_state(bed: SwarmBed) -> str:
    """The state of the worker's task of the (one) pre-pull service; "" when none yet."""
    services = [s for s in bed.services() if str(s["Spec"]["Name"]).startswith(PREPULL_PREFIX)]
    if len(services) != 1:
        return ""
    tasks = [t for t in bed.tasks(str(services[0]["ID"])) if t.get("NodeID") == bed.worker.node_id]
    return str(tasks[0]["Status"]["State"]) if tasks else ""


def test_cancelling_mid_pull_removes_the_service(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, stalled_worker: StalledWorker
) -> None:
    bed = swarm_scratch
    image = stalled_worker.hosted.image
    since = time.time()
    request = pulls_pb2.PullImageRequest(image=image.reference, backend=SWARM)
    call = pull_stub(swarm_broker).PullImage(request, timeout=PULL_TIMEOUT)

    first = next(iter(call))
    # The manager's pull is done; the worker's is under way, on the stalled registry.
    assert first.HasField("node")
    assert (first.node.node_id, first.node.state) == (bed.manager.node_id, PULLED)
    wait_until(
        lambda: True if stalled_worker.worker_relay.accepted else None,
        timeout=10.0,
        what="the worker's engine to reach the stalled registry",
    )
    assert worker_task_state(bed) in ("preparing", "assigned", "accepted", "ready")
    assert len(prepull_services(bed)) == 1

    call.cancel()  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.CANCELLED

    took = wait_for_no_prepull(bed, CLEANUP_BOUND, "the cancelled pull's service to go")
    assert took < CLEANUP_BOUND
    assert_one_prepull_came_and_went(bed, since)
    wait_for_no_task_containers(bed)
    assert not bed.worker.has_image(image.by_digest)


def test_an_expired_deadline_removes_the_service(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, stalled_worker: StalledWorker
) -> None:
    bed = swarm_scratch
    image = stalled_worker.hosted.image
    since = time.time()
    received: list[pulls_pb2.PullImageResponse] = []

    def call() -> None:
        request = pulls_pb2.PullImageRequest(image=image.reference, backend=SWARM)
        for message in pull_stub(swarm_broker).PullImage(request, timeout=4.0):
            received.append(message)

    started = time.monotonic()
    error = expect_error(call)
    ended = time.monotonic()

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ended - started < 4.0 + 2.0
    # The manager's outcome came before the deadline; the worker had none to give, and the
    # call's deadline is not turned into a node failure of the broker's own.
    events = [(m.node.node_id, m.node.state) for m in received]
    assert events == [(bed.manager.node_id, PULLED)]
    assert stalled_worker.worker_relay.accepted  # the worker was stuck on the registry
    wait_for_no_prepull(bed, CLEANUP_BOUND, "the expired pull's service to go")
    (audit,) = pull_audits(swarm_broker, image.reference, 1)
    assert (audit["code"], audit["error_reason"]) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
    assert_one_prepull_came_and_went(bed, since)
    wait_for_no_task_containers(bed)
    assert not bed.worker.has_image(image.by_digest)


def test_a_cancelled_pull_is_audited_as_cancelled(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, stalled_worker: StalledWorker
) -> None:
    bed = swarm_scratch
    image = stalled_worker.hosted.image
    request = pulls_pb2.PullImageRequest(image=image.reference, backend=SWARM)
    call = pull_stub(swarm_broker).PullImage(request, timeout=PULL_TIMEOUT)
    assert next(iter(call)).node.node_id == bed.manager.node_id
    assert len(prepull_services(bed)) == 1
    call.cancel()  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    wait_for_no_prepull(bed, CLEANUP_BOUND, "the cancelled pull's service to go")

    (audit,) = pull_audits(swarm_broker, image.reference, 1)

    # As a cancelled Docker pull is (tests/integration/test_pull_image.py).
    assert (audit["code"], audit["outcome"]) == ("CANCELLED", "FAILED")


# -- 6: placement constraints -------------------------------------------------------------


def test_placement_constraints_choose_the_nodes(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> None:
    bed = swarm_scratch
    manager, worker = bed.manager.node_id, bed.worker.node_id

    to_worker = hosted_image(bed, swarm_broker, secrets).image
    pulled = swarm_pull(
        swarm_broker,
        to_worker.reference,
        backend=SWARM,
        placement_constraints=["node.role==worker"],
    )
    assert pulled.states() == {worker: PULLED}
    assert [n.node_id for n in pulled.result.nodes] == [worker]
    assert bed.image_present(worker, to_worker.by_digest)
    assert not bed.image_present(manager, to_worker.by_digest)

    to_manager = hosted_image(bed, swarm_broker, secrets).image
    pulled = swarm_pull(
        swarm_broker,
        to_manager.reference,
        backend=SWARM,
        placement_constraints=[f"node.id=={manager}"],
    )
    assert pulled.states() == {manager: PULLED}
    assert [n.node_id for n in pulled.result.nodes] == [manager]
    assert bed.image_present(manager, to_manager.by_digest)
    assert not bed.image_present(worker, to_manager.by_digest)

    since = time.time()
    nowhere = expect_error(
        lambda: swarm_pull(
            swarm_broker,
            to_manager.reference,
            backend=SWARM,
            placement_constraints=["node.role==worker", f"node.id=={manager}"],
        )
    )
    assert nowhere.code == grpc.StatusCode.FAILED_PRECONDITION
    assert nowhere.reason == "NO_ELIGIBLE_NODE"
    assert not bed.image_present(worker, to_manager.by_digest)

    malformed = expect_error(
        lambda: swarm_pull(
            swarm_broker,
            to_manager.reference,
            backend=SWARM,
            placement_constraints=["node.role=worker"],
        )
    )
    assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "placement_constraints[0]" in malformed.violations
    assert [e for e in service_events(bed, since) if e[0] == "create"] == []
    assert prepull_services(bed) == []


# -- 7: already present --------------------------------------------------------------------


def test_second_pull_finds_the_image_already_on_the_manager(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> None:
    bed = swarm_scratch
    manager, worker = bed.manager.node_id, bed.worker.node_id
    image = hosted_image(bed, swarm_broker, secrets).image

    first = swarm_pull(swarm_broker, image.reference, backend=SWARM)
    second = swarm_pull(swarm_broker, image.reference, backend=SWARM)

    assert first.states() == {manager: PULLED, worker: PULLED}
    # The broker sees the manager's engine only: the worker that has it reports PULLED.
    assert second.states() == {manager: ALREADY_PRESENT, worker: PULLED}
    assert {n.node_id: n.state for n in second.result.nodes} == second.states()
    assert second.result.digest == first.result.digest == image.digest
    assert second.result.pinned_image == first.result.pinned_image


# -- 8: the X-Registry-Auth value ----------------------------------------------------------


def test_registry_auth_is_returned_only_when_asked_and_audited(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> None:
    bed = swarm_scratch
    image = hosted_image(bed, swarm_broker, secrets).image

    plain = swarm_pull(swarm_broker, image.reference, backend=SWARM).result
    asked = swarm_pull(
        swarm_broker, image.reference, backend=SWARM, include_registry_auth=True
    ).result

    assert plain.registry_auth == ""
    assert asked.registry_auth
    secrets.add(asked.registry_auth)
    decoded = json.loads(base64.urlsafe_b64decode(asked.registry_auth))
    assert set(decoded) == {"username", "password", "serveraddress"}
    assert decoded["username"] == bed.username
    assert decoded["serveraddress"] == bed.registry_address
    if decoded["password"] != bed.password:
        pytest.fail("the returned X-Registry-Auth does not hold the registry's password")
    first, second = pull_audits(swarm_broker, image.reference, 2)
    assert first["code"] == second["code"] == "OK"
    assert "registry_auth_returned" not in first
    assert second["registry_auth_returned"] == "yes"


# -- 9: credential rotation ----------------------------------------------------------------


def test_rotated_token_is_the_one_the_worker_pulls_with(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> None:
    bed = swarm_scratch
    manager, worker = bed.manager.node_id, bed.worker.node_id
    hosted = hosted_image(bed, swarm_broker, secrets)
    image = hosted.image
    assert swarm_pull(swarm_broker, image.reference, backend=SWARM).states() == {
        manager: PULLED,
        worker: PULLED,
    }
    bed.remove_image_everywhere(image)

    new_password = secrets.add(bed.rotate_registry_password())
    # The registry now refuses the token the broker still holds.
    stale = expect_error(lambda: swarm_pull(swarm_broker, image.reference, backend=SWARM))
    assert (stale.code, stale.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "REGISTRY_AUTH_FAILED",
    )
    control_without_auth_is_rejected(bed, image)

    swarm_broker.image_hosts().UpdateImageHost(
        pb.UpdateImageHostRequest(
            image_host=pb.ImageHost(name=hosted.host, access_token=new_password),
            update_mask=field_mask_pb2.FieldMask(paths=["access_token"]),
        ),
        timeout=10,
    )
    pulled = swarm_pull(swarm_broker, image.reference, backend=SWARM)

    assert pulled.states() == {manager: PULLED, worker: PULLED}
    assert bed.image_present(worker, image.by_digest)


# -- 10: a single-node swarm ---------------------------------------------------------------


def test_single_node_swarm_pulls_with_one_node_event(
    swarm_single_scratch: SwarmBed, tmp_path: Path
) -> None:
    bed = swarm_single_scratch
    secrets = Secrets()
    broker = BrokerProcess(tmp_path / "data", env={"DOCKER_HOST": bed.docker_host}).start()
    try:
        secrets.add(broker.admin_token())
        hosted = hosted_image(bed, broker, secrets)
        image = hosted.image
        manager = bed.manager.node_id

        pulled = swarm_pull(broker, image.reference)  # AUTO: a swarm manager

        assert pulled.states() == {manager: PULLED}
        assert pulled.result.backend == SWARM
        assert [n.node_id for n in pulled.result.nodes] == [manager]
        assert pulled.result.pinned_image == image.by_digest
        assert bed.image_present(manager, image.by_digest)
        assert prepull_services(bed) == []
        again = swarm_pull(broker, image.reference, backend=SWARM)
        assert again.states() == {manager: ALREADY_PRESENT}
        # Nothing to pull anywhere: no service at all.
        assert prepull_services(bed) == []
    finally:
        broker.stop()
    secrets.assert_absent(broker.text(), "the broker's output")


# -- 11: the README's launcher ------------------------------------------------------------


def readme_launcher() -> str:
    """The ```python block under "### Launching a service with the broker's credentials"."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Launching a service with the broker's credentials", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "the launcher section has no ```python block"
    return found.group(1)


@contextlib.contextmanager
def drained(bed: SwarmBed, node: SwarmNode) -> Iterator[None]:
    """`node` drained (no new tasks, not eligible for pulls), active again afterwards."""

    def set_availability(value: str) -> None:
        inspected = bed.manager.api.inspect_node(node.node_id)
        spec = {**inspected["Spec"], "Availability": value}
        bed.manager.api.update_node(node.node_id, inspected["Version"]["Index"], spec)

    set_availability("drain")
    try:
        yield
    finally:
        set_availability("active")
        wait_until(
            lambda: True if bed.node_states()[node.node_id] == ("ready", "active") else None,
            timeout=30.0,
            what=f"{node!r} active again",
        )


def run_launcher(
    bed: SwarmBed,
    broker: BrokerProcess,
    secrets: Secrets,
    image: PrivateImage,
    code: str,
    tmp_path: Path,
) -> tuple[subprocess.CompletedProcess[str], str]:
    script = tmp_path / "launcher.py"
    script.write_text(code)
    service_name = f"launched-{random.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDBROKER_", "DOCKER_"))}
    env.update(
        CREDBROKER_ADDRESS=broker.address,
        CREDBROKER_TOKEN_FILE=str(broker.admin_token_path),
        DOCKER_HOST=bed.docker_host,
        IMAGE=image.reference,
        SERVICE_NAME=service_name,
        PYTHONPATH=str(REPO_ROOT),
    )
    completed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    secrets.assert_absent(completed.stdout + completed.stderr, "the launcher's output")
    return completed, service_name


def check_launched_service(
    bed: SwarmBed,
    completed: subprocess.CompletedProcess[str],
    service_name: str,
    image: PrivateImage,
    since: float,
) -> None:
    assert completed.returncode == 0, completed.stderr[-3000:]
    worker = bed.worker
    lines = completed.stdout.splitlines()
    assert lines[0] == f"{worker.node_id} NODE_PULL_STATE_PULLED"
    (service,) = [s for s in bed.services() if s["Spec"]["Name"] == service_name]
    service_id = str(service["ID"])
    assert lines[1:] == [f"service {service_id}"]
    try:
        tasks = bed.wait_for_tasks(
            service_id,
            lambda tasks: any(
                t.get("NodeID") == worker.node_id
                and t["Status"]["State"] in ("running", "complete")
                for t in tasks
            ),
            timeout=30.0,
        )
        assert {t["Spec"]["ContainerSpec"]["Image"] for t in tasks} == {image.by_digest}
        # (A task that completed is replaced: restart condition `any`; a new one may not be
        # assigned to a node yet.)
        assert {t["NodeID"] for t in tasks if t.get("NodeID")} == {worker.node_id}
        assert worker.evidence_of_run(image, since)  # the image's own command ran there
    finally:
        bed.manager.api.remove_service(service_id)
        wait_for_no_task_containers(bed)


def test_readme_launcher_runs_as_written(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets, tmp_path: Path
) -> None:
    bed = swarm_scratch
    image = hosted_image(bed, swarm_broker, secrets).image
    since = time.time()
    with drained(bed, bed.manager):
        completed, service_name = run_launcher(
            bed, swarm_broker, secrets, image, readme_launcher(), tmp_path
        )
        check_launched_service(bed, completed, service_name, image, since)


# -- 12: the CLI ---------------------------------------------------------------------------


def credbroker(
    broker: BrokerProcess, secrets: Secrets, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    env.update(CREDBROKER_SERVER=broker.address, CREDBROKER_TOKEN_FILE=str(broker.admin_token_path))
    completed = subprocess.run(
        [str(CREDBROKER), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    secrets.assert_absent(completed.stdout, f"the stdout of credbroker {args}")
    secrets.assert_absent(completed.stderr, f"the stderr of credbroker {args}")
    return completed


def summary_fields(stdout: str) -> dict[str, str]:
    fields = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and " " not in key:
            fields[key] = value.strip()
    return fields


def test_cli_pull_swarm_prints_a_line_per_node(
    swarm_scratch: SwarmBed, swarm_broker: BrokerProcess, secrets: Secrets
) -> None:
    bed = swarm_scratch
    names = hostnames(bed)
    manager, worker = bed.manager.node_id, bed.worker.node_id
    hosted = hosted_image(bed, swarm_broker, secrets)
    image = hosted.image

    run = credbroker(swarm_broker, secrets, "pull", "--swarm", image.reference)

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    node_lines = [line for line in lines if line.startswith("node ")]
    assert sorted(node_lines) == sorted(
        f"node {node_id} ({names[node_id]}): PULLED" for node_id in (manager, worker)
    )
    assert lines[:2] == node_lines  # as they come, before the summary
    fields = summary_fields(run.stdout)
    assert fields["pulled"] == image.reference
    assert fields["digest"] == image.digest
    assert fields["pinned_image"] == image.by_digest
    assert fields["image_host"] == hosted.host
    assert fields["nodes"] == "2 pulled, 0 already present, 0 failed"
    assert bed.image_present(worker, image.by_digest)

    run = credbroker(swarm_broker, secrets, "pull", "--swarm", "--json", image.reference)
    assert run.returncode == 0, run.stderr
    messages = [json.loads(line) for line in run.stdout.splitlines()]
    assert [set(m) for m in messages] == [{"node"}, {"node"}, {"result"}]
    assert {m["node"]["node_id"]: m["node"]["state"] for m in messages[:2]} == {
        manager: "NODE_PULL_STATE_ALREADY_PRESENT",
        worker: "NODE_PULL_STATE_PULLED",
    }
    result = messages[-1]["result"]
    assert (result["digest"], result["pinned_image"], result["backend"]) == (
        image.digest,
        image.by_digest,
        "PULL_BACKEND_SWARM",
    )
    assert result["registry_auth"] == ""
    assert [n["node_id"] for n in result["nodes"]] == [m["node"]["node_id"] for m in messages[:2]]

    # A node that fails (the worker cannot reach this registry): exit 1, its reason shown.
    unreachable = hosted_image(bed, swarm_broker, secrets, registry=bed.manager_only_registry())
    run = credbroker(swarm_broker, secrets, "pull", "--swarm", unreachable.reference)
    assert run.returncode == 1, run.stdout + run.stderr
    node_lines = sorted(line for line in run.stdout.splitlines() if line.startswith("node "))
    assert node_lines[0 if manager < worker else 1] == f"node {manager} ({names[manager]}): PULLED"
    failed = node_lines[1 if manager < worker else 0]
    assert failed.startswith(f"node {worker} ({names[worker]}): FAILED: No such image: ")
    assert summary_fields(run.stdout)["nodes"] == "1 pulled, 0 already present, 1 failed"
    assert prepull_services(bed) == []
