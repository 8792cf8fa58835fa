"""Placement constraints and task outcomes of Swarm pulls (broker/core/swarm.py).

The pre-pull job itself runs on a real Swarm (tests/integration/test_swarm_pull.py);
these pin the pure rules it relies on: which nodes a constraint selects, and
what a finished task says about its node.
"""

from __future__ import annotations

import pytest

from broker.core.errors import InvalidArgument
from broker.core.swarm import (
    PREPULL_COMMAND,
    NodeState,
    PrepullTask,
    SwarmNode,
    judge,
    parse_constraints,
)
from broker.engines.swarm_engine import _timestamp

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
