"""A real Docker Swarm for tests: a manager and a worker dockerd in their own network namespaces.

Why this shape:

- Swarm managers listen on *:2377/7946; two nodes on one machine therefore need
  their own network namespaces (`/work/shared/reference/docker.md`), and a node
  in the root namespace would collide with any other swarm there.
- The namespaces are connected to each other only (one veth pair, both ends
  inside, `198.18.0.1/24` manager, `198.18.0.2/24` worker): nothing is added to
  the root namespace, so the fixed addresses cannot collide with `TestNetwork`'s
  random /29s of 198.18.0.0/15 there, nor with another bed running at the same time.
  This process reaches servers in a namespace with `create_connection()`, which
  opens the socket from a short-lived thread that `setns(2)`-ed into it.
- Each namespace is held by `unshare --net -- cat` (stdin a pipe: it also goes
  away when the test process dies); daemons and the registry are started with
  `nsenter --net=/proc/<holder>/ns/net` (`ip netns exec` would remount /sys and
  hide the cgroup v1 mounts); no name under /run/netns is ever created.
- Each node is a `DockerEngine` (own config file, data root, exec root, pidfile,
  unix socket, cgroup parent, private mount namespace) with
  `--insecure-registry 198.18.0.1:5000`.
- The registry (Debian `docker-registry`, htpasswd basic auth: anonymous pulls
  are refused) runs in the manager's namespace on `198.18.0.1:5000`, which both
  nodes reach. `manager_only_registry()` starts a second one on `127.0.0.1:5001`
  in the manager's namespace: the worker's 127.0.0.1 is its own, so only the
  manager can pull from it (for "one node cannot reach the registry").
- Images are made without any pull (busybox-static, `rootfs_tar()`); the
  command prints a unique marker, so "it never ran" is checkable on every node
  (container logs, `docker ps -a`, and `start` events in the engine's event log,
  which outlive the containers).

`SwarmBed.create(work_dir, nodes=2)` (or `nodes=1`: the manager alone, in its
own namespace, 198.18.0.1 on a veth whose peer stays inside) returns a running
bed with the private image pushed (`bed.image`); `close()` leaves the swarm,
stops the daemons (and their containerd), the registries and the namespace
holders (the veths go with their namespaces), removes cgroups, data roots and
registry storage; it also runs when `create()` fails half-way. Logs stay in
`work_dir` for failures to quote.

What this engine (dockerd 20.10) does with services, pinned by
`tests/integration/test_swarm_testbed.py`:

- A worker pulls with the X-Registry-Auth the service was created with; without
  it (or with wrong credentials, or when it cannot reach the registry) the pull
  error goes to the node's dockerd log only and the task ends `rejected`,
  message `preparing`, `Err` "No such image: <image as in the spec>".
- Mode `global` with restart condition `none` gives one task per node, ended
  in a terminal state within a second; `service rm` removes its tasks and their
  containers on every node. `global-job` ignores the restart policy (a failed
  task is replaced about every 0.6 s, for as long as the service exists), and a
  removed job service leaves its tasks and containers behind (moby/moby#42789,
  #44312): `remove_services()` force-removes those containers.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import requests.exceptions

from tests.support.docker_engine import DockerEngine, rootfs_tar, split_reference
from tests.support.docker_processes import (
    ManagedProcess,
    TestbedError,
    clean_environment,
    require_binary,
    run_checked,
    wait_until,
)
from tests.support.registry_servers import Listener, RegistryServer

T = TypeVar("T")

#: The swarm's own network, inside the namespaces only.
SWARM_PREFIX = 24
MANAGER_ADDRESS = "198.18.0.1"
WORKER_ADDRESS = "198.18.0.2"
REGISTRY_PORT = 5000
MANAGER_ONLY_PORT = 5001
SWARM_PORT = 2377
#: Bounded waits (the whole two-node bed is up in about 2 s here).
SWARM_TIMEOUT = 30.0
TASK_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 30.0
SETTLE = 0.5
#: Task states after which a task never changes again.
TERMINAL_TASK_STATES = frozenset(
    {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
)
DEFAULT_REPOSITORY = "credbroker/private"
DEFAULT_TAG = "1.0"
_CLONE_NEWNET = 0x40000000


def encode_registry_auth(auth_config: Mapping[str, str]) -> str:
    """The X-Registry-Auth value: JSON, base64url with padding (what the engine decodes)."""
    return base64.urlsafe_b64encode(json.dumps(dict(auth_config)).encode()).decode()


def service_spec(
    name: str,
    image: str,
    *,
    mode: str = "global",
    command: Sequence[str] | None = None,
    constraints: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The body of `POST /services/create`: restart condition `none`, no networks.

    `mode` is a docker-py `ServiceMode` name (`global`, `global-job`, `replicated`,
    `replicated-job`); `command` overrides the entrypoint (`ContainerSpec.Command`).
    """
    container = docker.types.ContainerSpec(image, command=list(command) if command else None)
    template = docker.types.TaskTemplate(
        container,
        restart_policy=docker.types.RestartPolicy(condition="none"),
        placement=docker.types.Placement(constraints=list(constraints)) if constraints else None,
    )
    return {
        "Name": name,
        "Labels": dict(labels or {}),
        "TaskTemplate": dict(template),
        "Mode": dict(docker.types.ServiceMode(mode)),
    }


# -- network namespaces ---------------------------------------------------------------


def _setns_thread(path: str, function: Callable[[], T], timeout: float) -> T:
    """Run `function` on a new thread that joined the network namespace at `path`.

    setns(CLONE_NEWNET) changes only the calling thread; sockets keep the namespace
    they were created in, so a socket made here can be used from any thread.
    """
    outcome: list[T] = []
    failure: list[Exception] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(descriptor, _CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns({path}): {os.strerror(error)}")
            finally:
                os.close(descriptor)
            outcome.append(function())
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(error)

    thread = threading.Thread(target=target, name="credbroker-setns", daemon=True)
    thread.start()
    thread.join(timeout + 5.0)
    if thread.is_alive():
        raise TestbedError(f"a call inside {path} did not return within {timeout:.0f}s")
    if failure:
        raise failure[0]
    return outcome[0]


class IsolatedNamespace:
    """A network namespace with `lo` up and no link to this host (see the module doc)."""

    def __init__(self, name: str, work_dir: Path) -> None:
        self.name = name
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        #: This namespace's addresses (set by whoever gives it an interface).
        self.addresses: list[str] = []
        self._holder: ManagedProcess | None = None
        self._ip = require_binary("ip", "iproute2")
        self._nsenter = require_binary("nsenter", "util-linux")

    @property
    def guest_addresses(self) -> list[str]:
        """`RegistryServer`'s name for `addresses`."""
        return list(self.addresses)

    @property
    def holder_pid(self) -> int:
        if self._holder is None:
            raise TestbedError(f"namespace {self.name} is not set up")
        return self._holder.pid

    @property
    def path(self) -> str:
        """`/proc/<holder>/ns/net`: what nsenter, setns and `DockerEngine` are given."""
        return f"/proc/{self.holder_pid}/ns/net"

    def start(self) -> IsolatedNamespace:
        unshare = require_binary("unshare", "util-linux")
        cat = require_binary("cat", "coreutils")
        holder = ManagedProcess(
            f"netns holder {self.name}",
            [unshare, "--net", "--", cat],
            self.work_dir / f"netns-{self.name}.log",
            stdin=subprocess.PIPE,
        )
        self._holder = holder.start()
        own = os.readlink("/proc/self/ns/net")
        wait_until(
            lambda: True if os.readlink(self.path) != own else None,
            timeout=5.0,
            what=f"unshare --net (namespace {self.name})",
            alive=holder.death,
        )
        self.run_inside([self._ip, "link", "set", "lo", "up"], f"bringing lo up in {self.name}")
        return self

    def command_inside(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so that it runs in the namespace (nsenter execs: same pid)."""
        return [self._nsenter, f"--net={self.path}", "--", *argv]

    def run_inside(self, argv: Sequence[str], what: str) -> str:
        return run_checked(self.command_inside(argv), what)

    def ip(self, *arguments: str, what: str) -> str:
        """`ip …` inside the namespace."""
        return self.run_inside([self._ip, *arguments], what)

    def start_inside(self, name: str, argv: Sequence[str], log_path: Path) -> ManagedProcess:
        return ManagedProcess(
            name, self.command_inside(argv), log_path, env=clean_environment()
        ).start()

    def create_connection(self, address: tuple[str, int], timeout: float) -> socket.socket:
        """A TCP connection made from inside the namespace (usable from any thread)."""
        return _setns_thread(self.path, lambda: socket.create_connection(address, timeout), timeout)

    def create_server(self, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        """A listening TCP socket bound inside the namespace (accept from any thread); the
        caller closes it."""
        return _setns_thread(self.path, lambda: socket.create_server(address), timeout)

    def close(self) -> None:
        """End the holder; the namespace (and its veth end) goes with its last process."""
        if self._holder is not None:
            self._holder.stop()
            self._holder = None


def _disable_ipv6(namespace: IsolatedNamespace, interface: str) -> None:
    """No link-local IPv6 addresses: the swarm speaks IPv4 on 198.18.0.0/24 only."""
    if not Path("/proc/sys/net/ipv6").exists():
        return
    sysctl = require_binary("sysctl", "procps")
    namespace.run_inside(
        [sysctl, "-q", "-w", f"net.ipv6.conf.{interface}.disable_ipv6=1"],
        f"disabling IPv6 on {interface} in {namespace.name}",
    )


def link_namespaces(manager: IsolatedNamespace, worker: IsolatedNamespace) -> None:
    """One veth pair, `eth0` in both namespaces; created inside: never in the root namespace."""
    manager.ip(
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        str(worker.holder_pid),
        what="creating the veth pair between the swarm namespaces",
    )
    for namespace, address in ((manager, MANAGER_ADDRESS), (worker, WORKER_ADDRESS)):
        _disable_ipv6(namespace, "eth0")
        namespace.ip(
            "address",
            "add",
            f"{address}/{SWARM_PREFIX}",
            "dev",
            "eth0",
            what=f"addressing eth0 in {namespace.name}",
        )
        namespace.ip("link", "set", "eth0", "up", what=f"bringing eth0 up in {namespace.name}")
        namespace.addresses = [address]


def address_alone(manager: IsolatedNamespace) -> None:
    """The single-node bed: `eth0` carries 198.18.0.1, its veth peer `eth1` stays inside.

    A swarm needs a non-loopback address to advertise, and the registry keeps the
    address it has in the two-node bed. A veth pair (not a dummy interface) because
    the veth driver is what the two-node bed needs anyway.
    """
    manager.ip(
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", what="creating eth0/eth1"
    )
    for interface in ("eth0", "eth1"):
        _disable_ipv6(manager, interface)
    manager.ip(
        "address",
        "add",
        f"{MANAGER_ADDRESS}/{SWARM_PREFIX}",
        "dev",
        "eth0",
        what="addressing eth0",
    )
    for interface in ("eth0", "eth1"):
        manager.ip("link", "set", interface, "up", what=f"bringing {interface} up")
    manager.addresses = [MANAGER_ADDRESS]


# -- nodes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivateImage:
    """An image pushed to a bed's registry (and removed from the engine that pushed it)."""

    registry: str
    repository: str
    tag: str
    digest: str
    #: What the image's default command prints; seeing it anywhere means it ran.
    marker: str

    @property
    def reference(self) -> str:
        """`198.18.0.1:5000/credbroker/private:1.0`"""
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def by_digest(self) -> str:
        """`198.18.0.1:5000/credbroker/private@sha256:…`"""
        return f"{self.registry}/{self.repository}@{self.digest}"

    @property
    def pinned(self) -> str:
        """`…/credbroker/private:1.0@sha256:…`, as the docker CLI pins a service's image."""
        return f"{self.reference}@{self.digest}"


class SwarmNode:
    """One dockerd of the bed; `node_id` is its swarm node id (hostnames are all equal)."""

    def __init__(self, role: str, namespace: IsolatedNamespace, engine: DockerEngine) -> None:
        self.role = role
        self.namespace = namespace
        self.engine = engine
        self.node_id = ""

    def __repr__(self) -> str:
        return f"SwarmNode(role={self.role!r}, node_id={self.node_id!r}, address={self.address!r})"

    @property
    def address(self) -> str:
        return self.namespace.addresses[0]

    @property
    def socket_path(self) -> Path:
        return self.engine.socket_path

    @property
    def docker_host(self) -> str:
        """`unix://…`: DOCKER_HOST for this node (the broker gets the manager's)."""
        return self.engine.docker_host

    @property
    def client(self) -> docker.DockerClient:
        """The bed's own client for this node (do not close it)."""
        return self.engine.client

    @property
    def api(self) -> docker.APIClient:
        return self.engine.api

    def api_client(self, timeout: float = 60.0) -> docker.APIClient:
        """A new low-level client (the caller closes it)."""
        return docker.APIClient(base_url=self.docker_host, timeout=timeout)

    def docker_client(self, timeout: float = 60.0) -> docker.DockerClient:
        """A new high-level client (the caller closes it)."""
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)

    def has_image(self, reference: str) -> bool:
        """Whether `reference` (tag or `repo@sha256:…`) resolves to an image on this node."""
        try:
            self.api.inspect_image(reference)
        except docker.errors.ImageNotFound:
            return False
        return True

    def image_ids(self) -> set[str]:
        return {str(image["Id"]) for image in self.api.images(all=True)}

    def remove_image(self, reference: str) -> None:
        """Remove an image (by reference or id) if present; forced (stopped containers)."""
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.api.remove_image(reference, force=True)

    def remove_container(self, container_id: str) -> None:
        """Force-remove a container; gone already (or being removed) is fine."""
        with contextlib.suppress(docker.errors.APIError):  # 404, or 409 "in progress"
            self.api.remove_container(container_id, force=True)

    def containers(self) -> list[dict[str, Any]]:
        """`docker ps -a` on this node (swarm task containers included)."""
        containers: list[dict[str, Any]] = self.api.containers(all=True)
        return containers

    def container_logs(self, container_id: str) -> str:
        output = self.api.logs(container_id, stdout=True, stderr=True)
        return output.decode(errors="replace") if isinstance(output, bytes) else str(output)

    def container_events(self, since: float, action: str = "start") -> list[dict[str, Any]]:
        """Container events (`start` by default) from `since` (epoch seconds) until now.

        The engine's event log outlives the containers: a container that started
        and was removed since still shows here. A container whose start failed
        (e.g. its command does not exist) has `create` but no `start` event.
        """
        events: list[dict[str, Any]] = list(
            self.api.events(
                since=since,
                until=time.time(),
                filters={"type": "container", "event": action},
                decode=True,
            )
        )
        return events

    def evidence_of_run(self, image: PrivateImage, since: float) -> list[str]:
        """Signs that a container of `image` ran its command here since `since` (empty: none).

        A `start` event of a container of the image's repository, or a container
        whose logs show the image's marker.
        """
        evidence = []
        name = f"{image.registry}/{image.repository}"
        for event in self.container_events(since):
            attributes = event.get("Actor", {}).get("Attributes", {})
            started = str(attributes.get("image", ""))
            if started == name or started.startswith((f"{name}:", f"{name}@")):
                container_id = str(event.get("Actor", {}).get("ID", ""))
                evidence.append(f"{self.role}: container {container_id[:12]} started")
        for container in self.containers():
            with contextlib.suppress(docker.errors.NotFound):
                if image.marker in self.container_logs(container["Id"]):
                    evidence.append(f"{self.role}: container {container['Id'][:12]} printed it")
        return evidence


# -- the bed --------------------------------------------------------------------------


class SwarmBed:
    """A running swarm (see the module doc). Attributes are what tests use."""

    def __init__(self, work_dir: Path, nodes: int = 2) -> None:
        if nodes not in (1, 2):
            raise ValueError("the bed has a manager and at most one worker")
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.node_count = nodes
        self.nodes: list[SwarmNode] = []
        self.registry: RegistryServer | None = None
        self._manager_only: RegistryServer | None = None
        self._namespaces: list[IsolatedNamespace] = []
        self._image: PrivateImage | None = None
        #: Epoch seconds when the bed was up (for `container_events`).
        self.started_at = 0.0

    def __repr__(self) -> str:
        return f"SwarmBed(nodes={self.nodes!r}, registry={self.registry!r})"

    @classmethod
    def create(cls, work_dir: Path, nodes: int = 2) -> SwarmBed:
        bed = cls(work_dir, nodes)
        try:
            bed._setup()
        except BaseException:
            bed.close()
            raise
        return bed

    # -- what tests use --------------------------------------------------------------

    @property
    def manager(self) -> SwarmNode:
        if not self.nodes:
            raise TestbedError("the swarm is not running")
        return self.nodes[0]

    @property
    def worker(self) -> SwarmNode:
        if len(self.nodes) < 2:
            raise TestbedError("this bed has no worker (it is the single-node bed)")
        return self.nodes[1]

    @property
    def docker_host(self) -> str:
        """DOCKER_HOST for the broker under test: the manager's socket."""
        return self.manager.docker_host

    @property
    def manager_socket(self) -> Path:
        return self.manager.socket_path

    @property
    def registry_address(self) -> str:
        """`198.18.0.1:5000`: reachable by every node."""
        return self._registry.address

    @property
    def username(self) -> str:
        return self._registry.username

    @property
    def password(self) -> str:
        return self._registry.password

    def auth_config(self, registry: RegistryServer | None = None) -> dict[str, str]:
        """docker-py's `auth_config` / the X-Registry-Auth JSON for `registry` (default: the
        shared one)."""
        return (registry or self._registry).auth_config()

    def registry_auth(self, registry: RegistryServer | None = None) -> str:
        """The encoded X-Registry-Auth header value."""
        return encode_registry_auth(self.auth_config(registry))

    @property
    def image(self) -> PrivateImage:
        """The private image pushed at setup (absent from every node)."""
        if self._image is None:
            raise TestbedError("the swarm bed is not running")
        return self._image

    def node(self, node_id: str) -> SwarmNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def namespaces(self) -> list[IsolatedNamespace]:
        """The network namespaces the bed made (manager's first)."""
        return list(self._namespaces)

    def image_present(self, node_id: str, reference: str) -> bool:
        """Whether the node with `node_id` has `reference` (tag or `repo@sha256:…`)."""
        return self.node(node_id).has_image(reference)

    def containers_by_node(self) -> dict[str, list[dict[str, Any]]]:
        """node id -> `docker ps -a` of that node."""
        return {node.node_id: node.containers() for node in self.nodes}

    @property
    def _registry(self) -> RegistryServer:
        if self.registry is None:
            raise TestbedError("the swarm bed's registry is not running")
        return self.registry

    # -- setup -----------------------------------------------------------------------

    def _setup(self) -> None:
        # Every prerequisite first, so that a missing one fails before anything starts.
        for binary, package in (
            ("nsenter", "util-linux"),
            ("unshare", "util-linux"),
            ("ip", "iproute2"),
            ("dockerd", "docker.io"),
            ("docker-registry", "docker-registry"),
        ):
            require_binary(binary, package)
        manager_ns = IsolatedNamespace("manager", self.work_dir)
        self._namespaces.append(manager_ns)
        manager_ns.start()
        if self.node_count == 2:
            worker_ns = IsolatedNamespace("worker", self.work_dir)
            self._namespaces.append(worker_ns)
            worker_ns.start()
            link_namespaces(manager_ns, worker_ns)
        else:
            address_alone(manager_ns)
        self.registry = RegistryServer(
            "swarm",
            self.work_dir / "registry",
            network=manager_ns,
            listener=Listener(
                f"{MANAGER_ADDRESS}:{REGISTRY_PORT}", f"{MANAGER_ADDRESS}:{REGISTRY_PORT}"
            ),
        )
        self.registry.start()
        for role, namespace in zip(("manager", "worker"), self._namespaces, strict=False):
            engine = DockerEngine(
                self.work_dir / f"dockerd-{role}",
                network_namespace=namespace.path,
                insecure_registries=[self.registry.address],
            )
            self.nodes.append(SwarmNode(role, namespace, engine))
        # One after the other, from this thread: the daemons are started through
        # `setpriv --pdeathsig`, which fires when the *thread* that forked them ends.
        for node in self.nodes:
            node.engine.start()
        self._form_swarm()
        self._image = self.push_private_image()
        self.started_at = time.time()

    def _form_swarm(self) -> None:
        manager = self.manager
        manager.api.init_swarm(
            advertise_addr=manager.address,
            listen_addr=f"{manager.address}:{SWARM_PORT}",
        )
        token = manager.api.inspect_swarm()["JoinTokens"]["Worker"]
        for node in self.nodes[1:]:
            node.api.join_swarm(
                remote_addrs=[f"{manager.address}:{SWARM_PORT}"],
                join_token=token,
                listen_addr=f"{node.address}:{SWARM_PORT}",
                advertise_addr=node.address,
            )
        for node in self.nodes:
            node.node_id = str(node.api.info()["Swarm"]["NodeID"])
        ids = {node.node_id for node in self.nodes}
        if "" in ids or len(ids) != len(self.nodes):
            raise TestbedError(f"swarm node ids are missing or equal: {self.nodes!r}")
        wait_until(
            lambda: True if self._all_ready(ids) else None,
            timeout=SWARM_TIMEOUT,
            what=f"swarm nodes {sorted(ids)} Ready+Active",
        )

    def _all_ready(self, ids: set[str]) -> bool:
        states = {
            node["ID"]: (node["Status"]["State"], node["Spec"]["Availability"])
            for node in self.manager.api.nodes()
        }
        return set(states) == ids and all(v == ("ready", "active") for v in states.values())

    def node_states(self) -> dict[str, tuple[str, str]]:
        """node id -> (Status.State, Spec.Availability), as the manager sees them."""
        return {
            str(node["ID"]): (str(node["Status"]["State"]), str(node["Spec"]["Availability"]))
            for node in self.manager.api.nodes()
        }

    # -- images ----------------------------------------------------------------------

    def push_private_image(
        self,
        repository: str = DEFAULT_REPOSITORY,
        tag: str = DEFAULT_TAG,
        marker: str | None = None,
        registry: RegistryServer | None = None,
    ) -> PrivateImage:
        """Build a busybox image (no pull) printing a unique marker, push it with
        credentials from the manager, then remove it from the manager again."""
        target = registry or self._registry
        marker = marker or f"credbroker-swarm-ran-{secrets.token_hex(6)}"
        reference = f"{target.address}/{repository}:{tag}"
        engine = self.manager.engine
        name, tag_part = split_reference(reference)
        engine.api.import_image_from_data(
            rootfs_tar(),
            repository=name,
            tag=tag_part,
            changes=[f'CMD ["/bin/sh", "-c", "echo {marker}"]'],
        )
        try:
            digest = engine.push(reference, target.auth_config())
        finally:
            engine.remove_image(reference)
        return PrivateImage(target.address, repository, tag, digest, marker)

    def manager_only_registry(self) -> RegistryServer:
        """A second registry at 127.0.0.1:5001 in the manager's namespace (started on first
        use, same kind of credentials): the manager can pull from it, the worker cannot."""
        if self._manager_only is None:
            server = RegistryServer(
                "swarm-manager-only",
                self.work_dir / "registry-manager-only",
                network=self.manager.namespace,
                listener=Listener(
                    f"127.0.0.1:{MANAGER_ONLY_PORT}", f"127.0.0.1:{MANAGER_ONLY_PORT}"
                ),
            )
            self._manager_only = server
            server.start()
        return self._manager_only

    def rotate_registry_password(self) -> str:
        """Give the shared registry's user a new password and return it: the registry is
        restarted (distribution 2.8 reads its htpasswd file once) on the same address,
        with the same storage; the old password is refused from then on, and
        `password`, `auth_config()` and `registry_auth()` give the new one."""
        server = self._registry
        server.stop()
        server.password = secrets.token_urlsafe(24)
        server.start()
        return server.password

    def remove_image_everywhere(self, image: PrivateImage) -> None:
        for node in self.nodes:
            for reference in (image.by_digest, image.reference):
                node.remove_image(reference)

    # -- services --------------------------------------------------------------------

    def services(self) -> list[dict[str, Any]]:
        services: list[dict[str, Any]] = self.manager.api.services()
        return services

    def create_service(self, spec: Mapping[str, Any], registry_auth: str | None = None) -> str:
        """`POST /services/create` with an optional raw X-Registry-Auth header.

        docker-py's `create_service` takes no credentials (only its loaded config
        files): this sends the header itself, through the manager's APIClient session.
        """
        api = self.manager.api
        headers = {"X-Registry-Auth": registry_auth} if registry_auth is not None else {}
        response = api.post(
            f"{api.base_url}/v{api.api_version}/services/create",
            data=json.dumps(dict(spec)),
            headers={"Content-Type": "application/json", **headers},
        )
        try:
            response.raise_for_status()
        except requests.exceptions.HTTPError as error:
            raise docker.errors.APIError(error, response=response) from None
        return str(response.json()["ID"])

    def tasks(self, service_id: str) -> list[dict[str, Any]]:
        """The service's tasks; also after it was removed (a `service` filter then 404s)."""
        tasks: list[dict[str, Any]] = self.manager.api.tasks()
        return [task for task in tasks if task.get("ServiceID") == service_id]

    def wait_for_tasks(
        self,
        service_id: str,
        done: Callable[[list[dict[str, Any]]], bool],
        timeout: float = TASK_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Poll the service's tasks until `done(tasks)`; bounded."""
        return wait_until(
            lambda: tasks if done(tasks := self.tasks(service_id)) else None,
            timeout=timeout,
            what=f"tasks of service {service_id}",
        )

    def wait_for_terminal_tasks(
        self, service_id: str, nodes: Iterable[SwarmNode], timeout: float = TASK_TIMEOUT
    ) -> dict[str, dict[str, Any]]:
        """node id -> the node's newest task once every given node has one in a terminal
        state (`TERMINAL_TASK_STATES`)."""
        wanted = {node.node_id for node in nodes}

        def newest(tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
            latest: dict[str, dict[str, Any]] = {}
            for task in tasks:
                node_id = task.get("NodeID", "")
                if node_id in wanted and (
                    node_id not in latest or task["CreatedAt"] > latest[node_id]["CreatedAt"]
                ):
                    latest[node_id] = task
            return latest

        def finished(tasks: list[dict[str, Any]]) -> bool:
            latest = newest(tasks)
            return set(latest) == wanted and all(
                t["Status"]["State"] in TERMINAL_TASK_STATES for t in latest.values()
            )

        return newest(self.wait_for_tasks(service_id, finished, timeout))

    def remove_services(self, timeout: float = CLEANUP_TIMEOUT) -> list[str]:
        """Remove every service, then every orphaned task container; bounded.

        Returns the names of the services that were there.
        """
        names = []
        for service in self.services():
            names.append(str(service["Spec"]["Name"]))
            with contextlib.suppress(docker.errors.NotFound):
                self.manager.api.remove_service(service["ID"])
        # Right after a removal an agent may still be creating a task's container.
        self.remove_orphaned_task_containers(timeout, settle=bool(names))
        return sorted(names)

    def remove_orphaned_task_containers(
        self, timeout: float = CLEANUP_TIMEOUT, *, settle: bool = False
    ) -> int:
        """Force-remove the task containers, on every node, of services that are gone.

        The engine does not remove the tasks nor the containers of a removed *job*
        service (moby/moby#42789, #44312: they stay until the node leaves the swarm),
        and a stopping replicated task may take its whole stop grace period. Once it
        removed one (or with `settle`), repeats until none has been seen for `SETTLE`
        seconds. Returns how many containers were removed.
        """
        removed: set[str] = set()
        clear_since: list[float] = []

        def orphans() -> list[tuple[SwarmNode, str]]:
            live = {str(service["ID"]) for service in self.services()}
            return [
                (node, container_id)
                for node, container_id, service_id in self.task_containers()
                if service_id not in live
            ]

        def settled() -> bool | None:
            remaining = orphans()
            for node, container_id in remaining:
                node.remove_container(container_id)
                removed.add(container_id)
            if remaining:
                clear_since.clear()
                return None
            if not removed and not settle:
                return True
            if not clear_since:
                clear_since.append(time.monotonic())
            return True if time.monotonic() - clear_since[0] >= SETTLE else None

        wait_until(settled, timeout=timeout, what="removing orphaned task containers")
        return len(removed)

    def task_containers(self) -> list[tuple[SwarmNode, str, str]]:
        """(node, container id, service id) of every swarm task container on every node."""
        found = []
        for node in self.nodes:
            for container in node.containers():
                labels = container.get("Labels") or {}
                if "com.docker.swarm.task.id" in labels:
                    found.append(
                        (node, str(container["Id"]), labels.get("com.docker.swarm.service.id", ""))
                    )
        return found

    # -- teardown --------------------------------------------------------------------

    def close(self) -> None:
        """Leave the swarm, stop everything, remove what was created. Idempotent."""
        for node in reversed(self.nodes):
            with contextlib.suppress(
                TestbedError, docker.errors.DockerException, requests.exceptions.RequestException
            ):
                node.api.leave_swarm(force=True)
        for node in reversed(self.nodes):
            node.engine.stop()
            shutil.rmtree(node.engine.data_root, ignore_errors=True)
        self.nodes = []
        for server in (self._manager_only, self.registry):
            if server is not None:
                server.stop()
                shutil.rmtree(server.storage, ignore_errors=True)
        self._manager_only = None
        self.registry = None
        for namespace in reversed(self._namespaces):
            namespace.close()
        self._namespaces = []
        self._image = None

    def __enter__(self) -> SwarmBed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
