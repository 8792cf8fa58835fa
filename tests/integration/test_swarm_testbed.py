"""The Swarm test bed itself: a real two-node swarm behaves as the Swarm pull code assumes.

Fixtures are in `tests/integration/conftest.py` (section "Swarm"). These tests also
pin what this engine (dockerd 20.10) reports for a pre-pull service, a `global`
service whose command (`/credbroker-prepull-never-runs`) does not exist, so that
nothing in the image ever runs: the production design rests on these facts.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import time
from pathlib import Path
from typing import Any

import docker
import docker.auth
import docker.errors
import docker.types
import pytest

from tests.support.docker_engine import DockerPullError
from tests.support.docker_processes import TestbedError, require_binary, wait_until
from tests.support.swarm_bed import (
    MANAGER_ADDRESS,
    PrivateImage,
    SwarmBed,
    SwarmNode,
    encode_registry_auth,
    service_spec,
)

pytestmark = pytest.mark.integration

NEVER_RUNS = "/credbroker-prepull-never-runs"
START_FAILED = f'exec: "{NEVER_RUNS}": stat {NEVER_RUNS}: no such file or directory'  # runc's words
SWARM_NET = ipaddress.IPv4Network("198.18.0.0/24")


def _wrong_credentials(bed: SwarmBed) -> dict[str, str]:
    return {**bed.auth_config(), "password": f"wrong-{secrets.token_hex(4)}"}


def _outcome(task: dict[str, Any]) -> tuple[str, str, str]:
    """(State, Message, Err) of a task: what a node reports, without the noise."""
    status = task["Status"]
    return str(status["State"]), str(status.get("Message", "")), str(status.get("Err", ""))


def _prepull(
    bed: SwarmBed, reference: str, registry_auth: str | None, nodes: list[SwarmNode]
) -> tuple[str, dict[str, dict[str, Any]]]:
    """A `global` pre-pull service; returns its id and each node's terminal task."""
    spec = service_spec(f"prepull-{secrets.token_hex(3)}", reference, command=[NEVER_RUNS])
    service_id = bed.create_service(spec, registry_auth)
    return service_id, bed.wait_for_terminal_tasks(service_id, nodes)


def _remove_and_wait(bed: SwarmBed, service_id: str) -> None:
    """`service rm` through the manager only, as the broker can: the swarm must clean up."""
    bed.manager.api.remove_service(service_id)
    wait_until(
        lambda: (
            True
            if not [c for c in bed.task_containers() if c[2] == service_id]
            and not bed.tasks(service_id)
            else None
        ),
        timeout=15.0,
        what=f"the swarm removing the tasks and containers of {service_id}",
    )


def _never_ran(bed: SwarmBed, image: PrivateImage, since: float) -> None:
    evidence = [line for node in bed.nodes for line in node.evidence_of_run(image, since)]
    assert evidence == []


@pytest.fixture
def no_docker_config_auth(swarm_bed: SwarmBed) -> None:
    """docker-py's clients add X-Registry-Auth from ~/.docker/config.json when it has an
    entry for the registry: a test of "no credentials" must be sure there is none."""
    config = docker.auth.load_config()
    assert docker.auth.resolve_authconfig(config, swarm_bed.registry_address) is None


# -- the bed --------------------------------------------------------------------------


def test_two_nodes_are_ready_with_distinct_ids(swarm_scratch: SwarmBed) -> None:
    bed = swarm_scratch
    manager, worker = bed.manager, bed.worker
    assert manager.node_id
    assert worker.node_id
    assert manager.node_id != worker.node_id
    assert bed.node_states() == {
        manager.node_id: ("ready", "active"),
        worker.node_id: ("ready", "active"),
    }
    manager_info, worker_info = manager.api.info(), worker.api.info()
    # Equal hostnames (one UTS namespace): nodes are told apart by id only.
    assert manager_info["Name"] == worker_info["Name"]
    assert manager_info["Swarm"]["NodeID"] == manager.node_id
    assert manager_info["Swarm"]["ControlAvailable"] is True
    assert worker_info["Swarm"]["NodeID"] == worker.node_id
    assert worker_info["Swarm"]["ControlAvailable"] is False
    assert worker_info["Swarm"]["RemoteManagers"] == [
        {"NodeID": manager.node_id, "Addr": f"{MANAGER_ADDRESS}:2377"}
    ]
    own = os.readlink("/proc/self/ns/net")
    namespaces = set()
    for node in bed.nodes:
        assert ipaddress.ip_address(node.address) in SWARM_NET
        assert node.docker_host == f"unix://{node.socket_path}"
        assert f"--insecure-registry={bed.registry_address}" in Path(
            f"/proc/{node.engine.pid}/cmdline"
        ).read_bytes().decode().split("\0")
        namespace = os.readlink(f"/proc/{node.engine.pid}/ns/net")
        assert namespace == os.readlink(node.namespace.path)
        namespaces.add(namespace)
    assert own not in namespaces
    assert len(namespaces) == 2
    assert bed.docker_host == manager.docker_host
    with manager.api_client() as api:
        assert api.inspect_node(worker.node_id)["Status"]["Addr"] == worker.address


def test_single_node_bed_works_too(swarm_single_scratch: SwarmBed) -> None:
    bed = swarm_single_scratch
    assert [node.role for node in bed.nodes] == ["manager"]
    assert bed.node_states() == {bed.manager.node_id: ("ready", "active")}
    with pytest.raises(TestbedError, match="no worker"):
        _ = bed.worker
    since = time.time()
    service_id, tasks = _prepull(bed, bed.image.pinned, bed.registry_auth(), bed.nodes)
    assert _outcome(tasks[bed.manager.node_id])[:2] == ("failed", "starting")
    assert bed.manager.has_image(bed.image.by_digest)
    _remove_and_wait(bed, service_id)
    _never_ran(bed, bed.image, since)


def test_registry_refuses_anonymous_pulls(swarm_scratch: SwarmBed) -> None:
    bed = swarm_scratch
    image = bed.image
    assert bed.registry is not None
    status, headers = bed.registry.get("/v2/")  # opened inside the manager's namespace
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="swarm-realm"'
    for node in bed.nodes:
        assert not node.has_image(image.by_digest)
    with pytest.raises(DockerPullError) as caught:
        bed.manager.engine.pull(image.reference)
    assert caught.value.message.endswith("no basic auth credentials")
    result = bed.manager.engine.pull(image.reference, bed.auth_config())
    assert result.digest == image.digest
    assert bed.manager.has_image(image.by_digest)
    assert not bed.worker.has_image(image.by_digest)


def test_inspect_distribution_resolves_the_digest_with_credentials(
    swarm_scratch: SwarmBed,
) -> None:
    """`GET /distribution/{name}/json`: what pinning an image to a digest on the manager
    returns, without pulling it."""
    bed = swarm_scratch
    image = bed.image
    api = bed.manager.api
    for reference in (image.reference, image.pinned, image.by_digest):
        answer = api.inspect_distribution(reference, auth_config=bed.auth_config())
        assert answer == {
            "Descriptor": {
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "digest": image.digest,
                "size": answer["Descriptor"]["size"],
            },
            "Platforms": [{"architecture": answer["Platforms"][0]["architecture"], "os": "linux"}],
        }
    with pytest.raises(docker.errors.APIError) as wrong:
        api.inspect_distribution(image.reference, auth_config=_wrong_credentials(bed))
    assert wrong.value.status_code == 401
    assert wrong.value.explanation == "unauthorized: authentication required"
    with pytest.raises(docker.errors.APIError) as anonymous:
        api.inspect_distribution(image.reference)
    assert anonymous.value.status_code == 500
    assert anonymous.value.explanation == (
        f'Head "http://{image.registry}/v2/{image.repository}/manifests/{image.tag}": '
        "no basic auth credentials"
    )
    assert not bed.manager.has_image(image.by_digest)


# -- services with and without credentials ---------------------------------------------


@pytest.mark.usefixtures("no_docker_config_auth")
def test_service_without_auth_fails_on_the_worker(swarm_scratch: SwarmBed) -> None:
    bed = swarm_scratch
    image, worker = bed.image, bed.worker
    with bed.manager.api_client() as api:
        template = docker.types.TaskTemplate(
            docker.types.ContainerSpec(image.reference),
            restart_policy=docker.types.RestartPolicy(condition="none"),
            placement=docker.types.Placement(constraints=[f"node.id=={worker.node_id}"]),
        )
        service_id = api.create_service(
            template, name="no-auth", mode=docker.types.ServiceMode("replicated", replicas=1)
        )["ID"]
    tasks = bed.wait_for_terminal_tasks(service_id, [worker])
    # The registry's "no basic auth credentials" only reaches the worker's dockerd log.
    assert _outcome(tasks[worker.node_id]) == (
        "rejected",
        "preparing",
        f"No such image: {image.reference}",
    )
    assert [task["NodeID"] for task in bed.tasks(service_id)] == [worker.node_id]
    assert not worker.has_image(image.reference)
    assert bed.containers_by_node() == {bed.manager.node_id: [], worker.node_id: []}
    _remove_and_wait(bed, service_id)


def test_service_with_auth_pulls_on_the_worker(swarm_scratch: SwarmBed) -> None:
    """The image's own command runs here (on purpose): proof that `evidence_of_run` sees
    a run, which the pre-pull tests rely on to show that nothing ran."""
    bed = swarm_scratch
    image, worker = bed.image, bed.worker
    since = time.time()
    spec = service_spec(
        "with-auth", image.pinned, mode="replicated", constraints=[f"node.id=={worker.node_id}"]
    )
    service_id = bed.create_service(spec, bed.registry_auth())
    tasks = bed.wait_for_terminal_tasks(service_id, [worker])
    assert _outcome(tasks[worker.node_id])[:2] == ("complete", "finished")
    assert bed.image_present(worker.node_id, image.by_digest)
    assert not bed.image_present(bed.manager.node_id, image.by_digest)
    evidence = worker.evidence_of_run(image, since)
    assert len(evidence) == 2  # a start event, and the marker in the container's logs
    assert bed.manager.evidence_of_run(image, since) == []
    _remove_and_wait(bed, service_id)


def test_manager_only_registry_is_unreachable_from_the_worker(swarm_scratch: SwarmBed) -> None:
    bed = swarm_scratch
    local = bed.manager_only_registry()
    assert local.address.startswith("127.0.0.1:")
    image = bed.push_private_image(repository="credbroker/local", registry=local)
    host, port = local.host, local.port
    bed.manager.namespace.create_connection((host, port), 2.0).close()
    with pytest.raises(ConnectionRefusedError):
        bed.worker.namespace.create_connection((host, port), 2.0).close()
    with pytest.raises(DockerPullError) as caught:
        bed.worker.engine.pull(image.reference, bed.auth_config(local))
    assert caught.value.message.endswith(f"dial tcp {local.address}: connect: connection refused")
    since = time.time()
    service_id, tasks = _prepull(bed, image.pinned, bed.registry_auth(local), bed.nodes)
    assert _outcome(tasks[bed.manager.node_id])[:2] == ("failed", "starting")
    assert _outcome(tasks[bed.worker.node_id]) == (
        "rejected",
        "preparing",
        f"No such image: {image.pinned}",
    )
    assert bed.manager.has_image(image.by_digest)
    assert not bed.worker.has_image(image.by_digest)
    _remove_and_wait(bed, service_id)
    _never_ran(bed, image, since)


# -- what a pre-pull service reports ----------------------------------------------------


def test_prepull_pulled_then_start_failed_and_nothing_ran(swarm_scratch: SwarmBed) -> None:
    """(a) the pull succeeded, the start failed; (c) the image was already there: the
    same report; `global` + restart `none` gives one task per node, and `service rm`
    through the manager removes tasks and containers on every node."""
    bed = swarm_scratch
    image = bed.image
    since = time.time()
    for _ in ("(a) pulled now", "(c) already present"):
        service_id, tasks = _prepull(bed, image.pinned, bed.registry_auth(), bed.nodes)
        for node in bed.nodes:
            state, message, error = _outcome(tasks[node.node_id])
            assert (state, message) == ("failed", "starting")
            assert error.startswith("starting container failed: ")
            assert START_FAILED in error
            assert tasks[node.node_id]["Status"]["ContainerStatus"]["ExitCode"] == 127
            assert node.has_image(image.by_digest)
        time.sleep(0.5)  # no replacement task appears (it would within ~0.6 s for a job)
        assert len(bed.tasks(service_id)) == len(bed.nodes)
        _remove_and_wait(bed, service_id)
    _never_ran(bed, image, since)


def test_prepull_without_usable_credentials_is_rejected(swarm_scratch: SwarmBed) -> None:
    """(b) no header, or a wrong password: "No such image", the registry's words are lost."""
    bed = swarm_scratch
    image = bed.image
    for registry_auth in (None, encode_registry_auth(_wrong_credentials(bed))):
        service_id, tasks = _prepull(bed, image.pinned, registry_auth, bed.nodes)
        for node in bed.nodes:
            assert _outcome(tasks[node.node_id]) == (
                "rejected",
                "preparing",
                f"No such image: {image.pinned}",
            )
            assert not node.has_image(image.by_digest)
        _remove_and_wait(bed, service_id)


def test_global_job_ignores_the_restart_policy_and_leaves_tasks(swarm_scratch: SwarmBed) -> None:
    """Why pre-pull services are `global`, not `global-job`, on this engine."""
    bed = swarm_scratch
    image = bed.image
    spec = service_spec("global-job", image.pinned, mode="global-job", command=[NEVER_RUNS])
    assert spec["Mode"] == {"GlobalJob": {}}  # docker-py 7.2's ServiceMode("global-job")
    service_id = bed.create_service(spec, bed.registry_auth())
    inspected = bed.manager.api.inspect_service(service_id)
    assert inspected["Spec"]["Mode"] == {"GlobalJob": {}}
    assert inspected["Spec"]["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"
    # Restart condition "none", yet each failed task is replaced, over and over.
    bed.wait_for_tasks(
        service_id,
        lambda tasks: all(
            sum(t["NodeID"] == node.node_id and t["Status"]["State"] == "failed" for t in tasks)
            >= 3
            for node in bed.nodes
        ),
        timeout=20.0,
    )
    bed.manager.api.remove_service(service_id)
    time.sleep(1.0)
    assert bed.tasks(service_id)  # moby/moby#44312: the tasks outlive the service
    assert [c for c in bed.task_containers() if c[2] == service_id]  # so do containers
    assert bed.remove_services() == []
    assert [c for c in bed.task_containers() if c[2] == service_id] == []


def test_passwords_stay_out_of_logs_and_reprs(swarm_scratch: SwarmBed) -> None:
    """The bed pushed with credentials, earlier tests sent them as X-Registry-Auth: none of
    that may end up in a log, a config file or a repr."""
    bed = swarm_scratch
    assert bed.password
    assert bed.password not in repr(bed)
    assert bed.password not in repr(bed.image)
    logs = [node.engine.log_path for node in bed.nodes]
    for server in (bed.registry, bed.manager_only_registry()):
        assert server is not None
        logs += [server.log_path, server.config_path]
    for path in logs:
        assert bed.password not in path.read_text(errors="replace"), path


# -- teardown --------------------------------------------------------------------------


_FOOTPRINTS: list[tuple[list[int], list[Path]]] = []


class _FailsHalfWay(SwarmBed):
    """Fails once the swarm is up, the image pushed and a service has run on every node
    (so that there are task containers, their cgroups and a service to clean up)."""

    def push_private_image(self, *args: Any, **kwargs: Any) -> PrivateImage:
        image = super().push_private_image(*args, **kwargs)
        spec = service_spec("left-running", image.pinned, mode="global")
        service_id = self.create_service(spec, self.registry_auth())
        tasks = self.wait_for_terminal_tasks(service_id, self.nodes)
        assert {_outcome(task)[0] for task in tasks.values()} == {"complete"}
        _FOOTPRINTS.append(_footprint(self))
        raise TestbedError("failing on purpose, half-way through the setup")


def _footprint(bed: SwarmBed) -> tuple[list[int], list[Path]]:
    """Processes and paths the bed created (every one must be gone after `close()`)."""
    pids = [namespace.holder_pid for namespace in bed.namespaces]
    paths: list[Path] = []
    cgroup_root = Path("/sys/fs/cgroup")
    for node in bed.nodes:
        engine = node.engine
        pids.append(engine.pid)
        containerd = engine.exec_root / "containerd" / "containerd.pid"
        pids.append(int(containerd.read_text().strip()))
        paths += [engine.run_dir, engine.data_root]
        cgroups = [cgroup_root / engine.cgroup_parent]
        cgroups += [d / engine.cgroup_parent for d in cgroup_root.iterdir() if d.is_dir()]
        existing = [path for path in cgroups if path.is_dir()]
        assert existing  # the service's containers ran under the engine's cgroup parent
        paths += existing
    assert bed.registry is not None
    paths.append(bed.registry.storage)
    return pids, paths


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_teardown_leaves_nothing_even_when_setup_fails(tmp_path: Path) -> None:
    _FOOTPRINTS.clear()
    with pytest.raises(TestbedError, match="failing on purpose"):
        _FailsHalfWay.create(tmp_path / "half", nodes=2)
    assert len(_FOOTPRINTS) == 1
    pids, paths = _FOOTPRINTS[0]
    assert len(pids) == 6  # two namespace holders, two dockerd, two containerd
    assert [pid for pid in pids if _alive(pid)] == []
    assert [path for path in paths if path.exists()] == []
    assert "credbroker" not in Path("/proc/self/mounts").read_text()
    assert (tmp_path / "half" / "dockerd-worker" / "dockerd.log").exists()  # logs stay


def test_a_missing_prerequisite_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def without_registry(name: str, package: str) -> str:
        hidden = f"{name}-hidden-by-test" if name == "docker-registry" else name
        return require_binary(hidden, package)

    monkeypatch.setattr("tests.support.swarm_bed.require_binary", without_registry)
    with pytest.raises(TestbedError, match="Debian package docker-registry is in DEB_PACKAGES"):
        SwarmBed.create(tmp_path / "missing")
    assert not (tmp_path / "missing" / "netns-manager.log").exists()  # nothing started
