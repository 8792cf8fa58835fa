"""The cost of a Swarm-aware pull, as ratios to a plain engine pull measured in the same run.

Starts the real two-node Swarm test bed (tests/support/swarm_bed.py: a manager and a
worker dockerd in their own network namespaces, 198.18.0.0/24, the bed's htpasswd
registry at 198.18.0.1:5000) and one real broker whose DOCKER_HOST is the manager, with
one image host for the bed's registry. For each of N iterations, fresh small images
(a unique marker: a digest no node has) are pushed, then PullImage is timed, from the
request to the end of its stream, one call at a time:

- baseline: backend DOCKER, a fresh image: the manager's engine pulls it with the
  broker's credentials (what a plain `docker pull` costs through the broker);
- SWARM, first pull of another fresh image: digest resolved on the manager, a
  short-lived global pre-pull service carrying X-Registry-Auth, one task per node pulls
  it, the broker polls the tasks and removes the service (both nodes PULLED);
- SWARM, second pull of that same image: the manager reports ALREADY_PRESENT, the worker
  (which the broker cannot see) still gets a pre-pull service, and finds it cached.

Every outcome is checked (digest, node states), the broker must leave no service
behind, and the images pulled are removed from every node after each iteration (after
the pre-pull tasks' containers are gone), so each baseline and first SWARM pull is a
real pull. One untimed warm-up iteration runs first. Prints seconds (median, p90) and
the ratio of each case's median to the baseline's; for the SWARM cases also where the
time goes: when the pre-pull service was created (the broker's work before it: engine
info, nodes, digest, the manager's own copy, stale services), when the last node was
reported (the tasks, as the broker's polling sees them) and how long the result took
after it (removing the service).

The bed is created on the main thread (its daemons die with the thread that started
them); the broker, the daemons, the registry and the namespaces are all stopped and
removed at the end. No credential is printed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from broker.v1 import image_hosts_pb2 as ih
from broker.v1 import pulls_pb2, pulls_pb2_grpc
from tests.support.broker_process import BrokerProcess
from tests.support.docker_processes import wait_until
from tests.support.swarm_bed import PrivateImage, SwarmBed

PULL_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 30.0
PREPULL_PREFIX = "credbroker-prepull-"
DOCKER = pulls_pb2.PULL_BACKEND_DOCKER
SWARM = pulls_pb2.PULL_BACKEND_SWARM
PULLED = pulls_pb2.NODE_PULL_STATE_PULLED
ALREADY_PRESENT = pulls_pb2.NODE_PULL_STATE_ALREADY_PRESENT


@dataclass
class Timed:
    """One PullImage: seconds to the end of the stream, to the last node event, and to
    the creation of its pre-pull service (the manager's event log; SWARM pulls that
    created one)."""

    total: float
    last_node: float
    result: pulls_pb2.PullResult
    states: dict[str, int]
    service_created: float | None = None


@dataclass
class Case:
    name: str
    pulls: list[Timed] = field(default_factory=list)


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


class Bench:
    def __init__(self, bed: SwarmBed, broker: BrokerProcess) -> None:
        self.bed = bed
        self.broker = broker
        self.stub = pulls_pb2_grpc.PullServiceStub(broker.channel())
        self.manager = bed.manager.node_id
        self.worker = bed.worker.node_id
        self.images_before = {node.node_id: node.image_ids() for node in bed.nodes}

    def add_image_host(self) -> None:
        self.broker.image_hosts().CreateImageHost(
            ih.CreateImageHostRequest(
                image_host_id="swarm-bed",
                image_host=ih.ImageHost(
                    url=f"http://{self.bed.registry_address}",
                    username=self.bed.username,
                    access_token=self.bed.password,
                ),
            ),
            timeout=10,
        )

    def fresh(self, repository: str) -> PrivateImage:
        image = self.bed.push_private_image(repository=repository)
        self.expect_pristine()
        return image

    def pull(self, image: PrivateImage, backend: pulls_pb2.PullBackend) -> Timed:
        request = pulls_pb2.PullImageRequest(image=image.reference, backend=backend)
        states: dict[str, int] = {}
        result: pulls_pb2.PullResult | None = None
        last_node = 0.0
        wall_start = time.time()
        start = time.perf_counter()
        for message in self.stub.PullImage(request, timeout=PULL_TIMEOUT):
            if message.HasField("node"):
                if message.node.node_id in states:
                    raise RuntimeError("a node was reported twice")
                states[message.node.node_id] = message.node.state
                last_node = time.perf_counter() - start
            elif message.HasField("result"):
                result = message.result
        total = time.perf_counter() - start
        if result is None:
            raise RuntimeError("the pull ended without a result")
        if result.digest != image.digest:
            raise RuntimeError("the pull reported another digest than the one pushed")
        if result.backend != backend:
            raise RuntimeError(f"backend {result.backend} answered, not {backend}")
        timed = Timed(total, last_node, result, states)
        if backend == SWARM:
            timed.service_created = self.service_created_after(wall_start)
        return timed

    def service_created_after(self, wall_start: float) -> float:
        """Seconds from `wall_start` to the one pre-pull service created since then."""
        events = self.bed.manager.api.events(
            since=wall_start - 1,
            until=time.time() + 0.001,
            filters={"type": "service", "event": "create"},
            decode=True,
        )
        created = [
            int(e["timeNano"]) / 1e9 - wall_start
            for e in events
            if str(e.get("Actor", {}).get("Attributes", {}).get("name", "")).startswith(
                PREPULL_PREFIX
            )
            and int(e["timeNano"]) / 1e9 >= wall_start
        ]
        if len(created) != 1:
            raise RuntimeError(f"{len(created)} pre-pull services created by one SWARM pull")
        return created[0]

    def expect_states(self, timed: Timed, manager: int, what: str) -> None:
        wanted = {self.manager: manager, self.worker: PULLED}
        if timed.states != wanted:
            found = {
                ("manager" if k == self.manager else "worker"): pulls_pb2.NodePullState.Name(v)
                for k, v in timed.states.items()
            }
            raise RuntimeError(f"{what}: node states {found}")

    def no_prepull_service(self) -> None:
        left = [
            str(s["Spec"]["Name"])
            for s in self.bed.services()
            if str(s["Spec"]["Name"]).startswith(PREPULL_PREFIX)
        ]
        if left:
            raise RuntimeError(f"the broker left pre-pull services behind: {left}")

    def clean(self) -> None:
        """Wait for the pre-pull task containers to go, then remove every image pulled."""
        self.no_prepull_service()
        wait_until(
            lambda: True if not self.bed.task_containers() else None,
            timeout=CLEANUP_TIMEOUT,
            what="the pre-pull tasks' containers to go",
        )
        for node in self.bed.nodes:
            for image_id in node.image_ids() - self.images_before[node.node_id]:
                node.remove_image(image_id)
        self.expect_pristine()

    def expect_pristine(self) -> None:
        for node in self.bed.nodes:
            if node.image_ids() != self.images_before[node.node_id]:
                raise RuntimeError(f"{node.role} holds images from an earlier pull")

    def iteration(self, docker_image: PrivateImage, swarm_image: PrivateImage) -> list[Timed]:
        plain = self.pull(docker_image, DOCKER)
        if not self.bed.manager.has_image(docker_image.by_digest):
            raise RuntimeError("the DOCKER pull left no image on the manager")
        if self.bed.worker.has_image(docker_image.by_digest):
            raise RuntimeError("the DOCKER pull reached the worker")
        self.clean()
        first = self.pull(swarm_image, SWARM)
        self.expect_states(first, PULLED, "first SWARM pull")
        self.no_prepull_service()
        second = self.pull(swarm_image, SWARM)
        self.expect_states(second, ALREADY_PRESENT, "second SWARM pull")
        self.clean()
        return [plain, first, second]


def report(cases: list[Case]) -> None:
    baseline = statistics.median(p.total for p in cases[0].pulls)
    print(
        f"{'case':<56} {'pulls':>5} {'median s':>9} {'p90 s':>7} {'x baseline':>10}"
        f" {'service created s':>17} {'last node s':>11} {'then result s':>13}"
    )
    for case in cases:
        totals = [p.total for p in case.pulls]
        median = statistics.median(totals)
        line = (
            f"{case.name:<56} {len(totals):>5} {median:>9.3f} {p90(totals):>7.3f}"
            f" {median / baseline:>10.2f}"
        )
        created = [p.service_created for p in case.pulls if p.service_created is not None]
        if created:
            last = statistics.median(p.last_node for p in case.pulls)
            after = statistics.median(p.total - p.last_node for p in case.pulls)
            line += f" {statistics.median(created):>17.3f} {last:>11.3f} {after:>13.3f}"
        print(line)


def run(bench: Bench, images: int, progress: Callable[[str], None]) -> list[Case]:
    cases = [
        Case("PullImage DOCKER, manager's engine (baseline)"),
        Case("PullImage SWARM, both nodes pull"),
        Case("PullImage SWARM again (manager present, worker cached)"),
    ]
    for index in range(images + 1):
        docker_image = bench.fresh(f"bench/docker{index}")
        swarm_image = bench.fresh(f"bench/swarm{index}")
        timed = bench.iteration(docker_image, swarm_image)
        if index == 0:
            progress("warm-up done")
            continue  # the warm-up: connections, engine version negotiation, caches
        for case, pull in zip(cases, timed, strict=True):
            case.pulls.append(pull)
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10, help="N: fresh images per case")
    args = parser.parse_args()

    began = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - began:5.1f} s] {what}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-swarm-") as tmp:
        # On this (the main) thread: the bed's daemons die with the thread that started them.
        bed = SwarmBed.create(Path(tmp) / "bed", nodes=2)
        broker: BrokerProcess | None = None
        try:
            progress("two-node swarm bed up")
            broker = BrokerProcess(Path(tmp) / "data", env={"DOCKER_HOST": bed.docker_host}).start()
            bench = Bench(bed, broker)
            bench.add_image_host()
            print(
                f"manager + worker, registry {bed.registry_address}; {args.images} fresh images "
                "per case, one pull at a time; x baseline = median time / baseline median time",
                flush=True,
            )
            cases = run(bench, args.images, progress)
            progress(f"{args.images} iterations done")
            report(cases)
        finally:
            if broker is not None:
                broker.stop()
            bed.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
