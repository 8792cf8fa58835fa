"""Placement constraints and task outcomes of Swarm pulls (broker/core/swarm.py).

The pre-pull job itself runs on a real Swarm (tests/integration/test_swarm_pull.py);
these pin the pure rules it relies on: which nodes a constraint selects, and
what a finished task says about its node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from broker.core.audit import Actor, discard_audit
from broker.core.errors import Cancelled, DeadlineExceeded, InvalidArgument
from broker.core.image_hosts import ImageHostCatalog
from broker.core.resolution import CredentialResolver
from broker.core.secrets import Secret
from broker.core.swarm import (
    PREPULL_COMMAND,
    NodeOutcome,
    NodeState,
    PrepullTask,
    SwarmNode,
    SwarmPuller,
    SwarmPullOutcome,
    SwarmPullSettings,
    judge,
    parse_constraints,
)
from broker.engines.swarm_engine import _timestamp
from broker.stores.memory import MemoryStore

ADMIN = Actor(principal="admin")


def _yes() -> bool:
    return True


WORKER = SwarmNode(
    id="w1abc",
    hostname="Box",
    role="worker",
    ready=True,
    active=True,
    os="linux",
    arch="x86_64",
    labels={"zone": "eu", "gpu": "true"},
    engine_labels={"tier": "fast"},
)


@pytest.mark.parametrize(
    ("constraint", "matches"),
    [
        ("node.role==worker", True),
        ("node.role==manager", False),
        ("node.role!=manager", True),
        ("node.id==w1abc", True),
        ("node.id!=w1abc", False),
        ("node.hostname==box", True),  # Swarm compares case-insensitively
        ("node.platform.os==linux", True),
        ("node.platform.arch==amd64", True),  # x86_64 is amd64 to Swarm
        ("node.platform.arch==x86_64", True),
        ("node.platform.arch==arm64", False),
        ("node.labels.zone==eu", True),
        ("node.labels.zone==us", False),
        ("node.labels.missing==x", False),  # a missing label never equals ...
        ("node.labels.missing!=x", True),  # ... and always differs
        ("engine.labels.tier==fast", True),
        ("engine.labels.zone==eu", False),  # node labels are not engine labels
        ("  node.labels.gpu == true  ", True),
    ],
)
def test_constraint_selects_nodes_as_swarm_does(constraint: str, matches: bool) -> None:
    (parsed,) = parse_constraints([constraint])
    assert parsed.matches(WORKER) is matches


@pytest.mark.parametrize(
    ("constraint", "rule"),
    [
        ("node.role=worker", "must be `key==value` or `key!=value`"),
        ("node.role==", "must be `key==value` or `key!=value`"),
        ("==worker", "must be `key==value` or `key!=value`"),
        ("node.ip==10.0.0.1", "key must be node.id"),
        ("node.labels.==x", "key must be node.id"),
        ("node.role==boss", "node.role is `manager` or `worker`"),
    ],
)
def test_bad_constraint_names_its_index_and_rule(constraint: str, rule: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_constraints(["node.role==worker", constraint])
    (violation,) = raised.value.violations
    assert violation.field == "placement_constraints[1]"
    assert rule in violation.description


def test_too_many_constraints_are_refused() -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_constraints(["node.role==worker"] * 33)
    assert raised.value.violations[0].field == "placement_constraints"


@pytest.mark.parametrize(
    ("task", "state"),
    [
        # The pull worked; starting the sentinel command failed, as it always must.
        (
            PrepullTask("n", "failed", "started", f'exec: "{PREPULL_COMMAND}": no such file'),
            NodeState.PULLED,
        ),
        (
            PrepullTask("n", "rejected", "preparing", "No such image: reg/app@sha256:1"),
            NodeState.FAILED,
        ),
        (PrepullTask("n", "failed", "", "unauthorized: authentication required"), NodeState.FAILED),
        # Another start failure than the sentinel's (seen once: a reused task container).
        (
            PrepullTask("n", "failed", "starting", "cannot start a stopped process"),
            NodeState.PULLED,
        ),
        (PrepullTask("n", "preparing"), None),
        (PrepullTask("n", "pending", "no suitable node"), None),
        (PrepullTask("n", "complete"), NodeState.PULLED),
    ],
)
def test_task_outcome(task: PrepullTask, state: NodeState | None) -> None:
    assert judge(task) is state


def test_swarm_times_with_nanoseconds_parse() -> None:
    parsed = _timestamp("2026-11-30T08:40:01.123456789Z")
    assert parsed is not None
    assert (parsed.year, parsed.second, parsed.microsecond) == (2026, 1, 123456)
    assert parsed.utcoffset() is not None
    assert _timestamp("not a time") is None


# -- the pre-pull's clock: what the real bed cannot make happen on demand -------------------


class TimedSwarm:
    """A SwarmEngine whose tasks stay as the test sets them, on a clock the test drives.

    The real bed (tests/integration/test_swarm_pull.py) covers pulls, failures,
    cancellation and deadlines; a task Swarm cannot place, and the broker's own
    timeout, need minutes or a second platform there.
    """

    def __init__(self, tasks: dict[str, PrepullTask]) -> None:
        self.tasks = tasks
        self.services: list[str] = []
        self.clock = 0.0
        self.nodes_ = [
            SwarmNode(id=n, hostname=f"host-{n}", role="worker", ready=True, active=True)
            for n in ("n1", "n2")
        ]

    def is_swarm_manager(self) -> bool:
        return True

    def local_node_id(self) -> str:
        return "manager-elsewhere"

    def nodes(self) -> list[SwarmNode]:
        return list(self.nodes_)

    def resolve_digest(self, image: str, auth_config: Mapping[str, str] | None) -> str:
        return "sha256:" + "a" * 64

    def has_image(self, image: str) -> bool:
        return False

    def start_prepull(
        self,
        image: str,
        registry_auth: Secret,
        constraints: Sequence[str],
        labels: Mapping[str, str],
    ) -> str:
        self.services.append("svc")
        return "svc"

    def prepull_tasks(self, service_id: str) -> list[PrepullTask]:
        return list(self.tasks.values())

    def remove_prepull(self, service_id: str) -> None:
        self.services.remove(service_id)

    def remove_stale_prepulls(self, older_than: float) -> int:
        return 0

    def sleep(self, seconds: float) -> None:
        self.clock += seconds


def _puller(engine: TimedSwarm) -> SwarmPuller:
    catalog = ImageHostCatalog(MemoryStore(), discard_audit)
    catalog.ensure_seeded()
    return SwarmPuller(
        CredentialResolver(catalog, discard_audit),
        engine,
        SwarmPullSettings(timeout=60.0, schedule_grace=5.0),
        clock=lambda: engine.clock,
        sleep=engine.sleep,
    )


def _nodes_of(events: list[NodeOutcome | SwarmPullOutcome]) -> dict[str, tuple[NodeState, str]]:
    return {e.node_id: (e.state, e.reason) for e in events if isinstance(e, NodeOutcome)}


def test_a_task_swarm_cannot_place_fails_its_node_after_the_grace() -> None:
    engine = TimedSwarm(
        {
            "n1": PrepullTask("n1", "failed", "starting", f'exec: "{PREPULL_COMMAND}": nope'),
            "n2": PrepullTask("n2", "pending", "no suitable node (unsupported platform)"),
        }
    )
    events = list(_puller(engine).pull("127.0.0.1:5000/app:1", [], False, ADMIN, _yes, None))

    assert _nodes_of(events)["n1"] == (NodeState.PULLED, "")
    state, reason = _nodes_of(events)["n2"]
    assert state is NodeState.FAILED
    assert reason == (
        "the Swarm could not place the pre-pull task on this node: "
        "no suitable node (unsupported platform)"
    )
    assert 5.0 < engine.clock < 6.0  # the grace, not the 60 s timeout
    assert isinstance(events[-1], SwarmPullOutcome)
    assert engine.services == []


def test_the_brokers_own_timeout_reports_the_nodes_and_still_answers() -> None:
    engine = TimedSwarm({n: PrepullTask(n, "preparing", "preparing") for n in ("n1", "n2")})
    events = list(_puller(engine).pull("127.0.0.1:5000/app:1", [], False, ADMIN, _yes, None))

    nodes = _nodes_of(events)
    assert {state for state, _ in nodes.values()} == {NodeState.FAILED}
    assert nodes["n1"][1] == "timed out with the pre-pull task preparing: preparing"
    assert 60.0 <= engine.clock < 61.0
    result = events[-1]
    assert isinstance(result, SwarmPullOutcome)
    assert result.pinned_image == "127.0.0.1:5000/app@sha256:" + "a" * 64
    assert engine.services == []


@pytest.mark.parametrize(("time_remaining", "error"), [(None, Cancelled), (1.0, DeadlineExceeded)])
def test_a_call_that_ends_early_removes_the_service_and_says_why(
    time_remaining: float | None, error: type[Exception]
) -> None:
    engine = TimedSwarm({n: PrepullTask(n, "preparing", "preparing") for n in ("n1", "n2")})
    polls = iter(range(100))

    def active() -> bool:
        # Gone after 30 polls of 50 ms: 1.5 s, past a deadline of 1 s.
        return next(polls) < 30

    with pytest.raises(error):
        list(_puller(engine).pull("127.0.0.1:5000/app:1", [], False, ADMIN, active, time_remaining))
    assert engine.services == []
