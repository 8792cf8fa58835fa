"""Swarm pulls: get an image onto every Swarm node that will run it.

A Swarm worker never reads the launcher's Docker config: it pulls with the
registry auth carried in the service spec, or not at all. So the broker

1. resolves the image's credentials and its digest on the manager without
   pulling (the registry is asked through the manager's engine), and pins the
   reference to that digest, so every node gets the same image;
2. creates one short-lived *global* service per pull (restart condition none:
   one task per node), constrained to the eligible nodes, whose spec carries
   the X-Registry-Auth header and the pinned image;
   each node's task pulls the image, then fails to start a command that cannot
   exist (`PREPULL_COMMAND`): the image's own entrypoint or command never runs;
3. reads each node's outcome from its task, and removes the service whatever
   happens (success, error, deadline, cancellation).

What a node reports: a task that got as far as starting the sentinel command
had the image (PULLED); a task that failed before it did not (FAILED, with the
engine's words). The broker sees only the manager's own engine, so only there
can it tell that the image was ALREADY_PRESENT before the pull (and skip the
node); a worker that had it is reported PULLED. A failed pull reaches the task
as the engine's `No such image: ...` whatever the registry said (the registry's
words stay in that worker's daemon log): that is the reason a node reports.

Why not a *global job*: on the engines seen (20.10), a job ignores restart
condition none (a failed task is replaced every half second while the service
exists) and its tasks and containers outlive `service rm` on the workers.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from broker.core.audit import Actor
from broker.core.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument
from broker.core.resolution import CredentialResolver
from broker.core.secrets import EMPTY_SECRET, Secret

#: The pre-pull service's command: an absolute path no image has, so starting the
#: container fails right after the pull and nothing of the image ever runs.
PREPULL_COMMAND = "/credbroker-prepull-never-runs"
#: Label on every pre-pull service, so leftovers of a crashed broker can be found.
PREPULL_LABEL = "dev.credbroker.prepull"
MAX_CONSTRAINTS = 32
#: How far the call's end may precede its deadline by our clock and still be that deadline.
_CLOCK_SLACK = 0.5
_CONSTRAINT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(==|!=)\s*(\S(?:.*\S)?)\s*$")
_PLAIN_KEYS = frozenset(
    {"node.id", "node.hostname", "node.role", "node.platform.os", "node.platform.arch"}
)
_LABEL_PREFIXES = ("node.labels.", "engine.labels.")
#: Architectures as Swarm normalises them when matching `node.platform.arch`.
_ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64", "armhf": "arm", "i386": "386"}


class NodeState(enum.Enum):
    PULLED = "PULLED"
    ALREADY_PRESENT = "ALREADY_PRESENT"
    FAILED = "FAILED"


@dataclass(frozen=True)
class SwarmNode:
    id: str
    hostname: str
    role: str
    ready: bool
    active: bool
    os: str = ""
    arch: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    engine_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeOutcome:
    node_id: str
    hostname: str
    state: NodeState
    reason: str = ""


@dataclass(frozen=True)
class PrepullTask:
    """The engine's view of one node's pre-pull task."""

    node_id: str
    state: str
    message: str = ""
    error: str = ""


@dataclass(frozen=True)
class Constraint:
    """One `key==value` / `key!=value` placement constraint, matched as Swarm does
    (case-insensitively; a missing label never equals and always differs)."""

    key: str
    equal: bool
    value: str

    def matches(self, node: SwarmNode) -> bool:
        candidates = self._values_of(node)
        found = any(self.value.casefold() == c.casefold() for c in candidates)
        return found if self.equal else not found

    def _values_of(self, node: SwarmNode) -> list[str]:
        key = self.key.lower()
        if key.startswith("node.labels."):
            value = node.labels.get(self.key[len("node.labels.") :])
            return [] if value is None else [value]
        if key.startswith("engine.labels."):
            value = node.engine_labels.get(self.key[len("engine.labels.") :])
            return [] if value is None else [value]
        if key == "node.platform.arch":
            return [node.arch, _ARCH_ALIASES.get(node.arch, node.arch)]
        return [
            {
                "node.id": node.id,
                "node.hostname": node.hostname,
                "node.role": node.role,
                "node.platform.os": node.os,
            }[key]
        ]

    def __str__(self) -> str:
        return f"{self.key}{'==' if self.equal else '!='}{self.value}"


def parse_constraints(texts: Sequence[str]) -> list[Constraint]:
    """Placement constraints in `docker service create --constraint` syntax."""
    if len(texts) > MAX_CONSTRAINTS:
        raise InvalidArgument.single(
            "placement_constraints", f"at most {MAX_CONSTRAINTS} constraints are allowed"
        )
    constraints = []
    for index, text in enumerate(texts):
        name = f"placement_constraints[{index}]"
        found = _CONSTRAINT.match(text)
        if not found:
            raise InvalidArgument.single(name, "must be `key==value` or `key!=value`")
        key, operator, value = found.groups()
        lowered = key.lower()
        if lowered not in _PLAIN_KEYS and not any(
            lowered.startswith(p) and len(lowered) > len(p) for p in _LABEL_PREFIXES
        ):
            raise InvalidArgument.single(
                name,
                "key must be node.id, node.hostname, node.role, node.platform.os, "
                "node.platform.arch, node.labels.<name> or engine.labels.<name>",
            )
        if lowered == "node.role" and value.lower() not in ("manager", "worker"):
            raise InvalidArgument.single(name, "node.role is `manager` or `worker`")
        constraints.append(Constraint(key=key, equal=operator == "==", value=value))
    return constraints


class SwarmEngine(Protocol):
    """A Swarm manager's engine (broker/engines/swarm_engine.py)."""

    def is_swarm_manager(self) -> bool:
        """True when the engine is an active Swarm manager."""
        ...

    def local_node_id(self) -> str: ...

    def nodes(self) -> list[SwarmNode]: ...

    def resolve_digest(self, image: str, auth_config: Mapping[str, str] | None) -> str:
        """The manifest digest of `image`, asked of its registry without pulling."""
        ...

    def has_image(self, image: str) -> bool:
        """Whether the manager's own engine already holds `image`."""
        ...

    def start_prepull(
        self,
        image: str,
        registry_auth: Secret,
        constraints: Sequence[str],
        labels: Mapping[str, str],
    ) -> str:
        """Create the pre-pull service; return its id."""
        ...

    def prepull_tasks(self, service_id: str) -> list[PrepullTask]: ...

    def remove_prepull(self, service_id: str) -> None: ...

    def remove_stale_prepulls(self, older_than: float) -> int:
        """Remove pre-pull services created more than `older_than` seconds ago."""
        ...


@dataclass(frozen=True)
class SwarmPullOutcome:
    image: str
    name: str
    digest: str
    image_host: str
    nodes: tuple[NodeOutcome, ...]
    registry_auth: Secret = EMPTY_SECRET

    @property
    def pinned_image(self) -> str:
        return f"{self.name}@{self.digest}"


_ENDED = frozenset({"failed", "rejected", "shutdown", "orphaned", "remove"})
#: Task status messages after the prepare step, where the pull happens: a task that
#: got there had the image, whatever then stopped it starting.
_PAST_THE_PULL = frozenset({"ready", "starting", "started", "running", "finished"})


def judge(task: PrepullTask) -> NodeState | None:
    """A finished task's outcome for its node; None while it is still going."""
    if (
        PREPULL_COMMAND in task.error
        or task.state in ("starting", "running", "complete")
        or (task.state in _ENDED and task.message.lower() in _PAST_THE_PULL)
    ):
        return NodeState.PULLED
    if task.state in _ENDED:
        return NodeState.FAILED
    return None


@dataclass
class SwarmPullSettings:
    #: Longest a pull may take when the call has no (shorter) deadline.
    timeout: float = 600.0
    #: How long a node may go without a task before it is reported FAILED.
    schedule_grace: float = 20.0
    #: Task states are polled every `poll_interval` for `fast_poll_period` (small images
    #: land within half a second), then less and less often up to `max_poll_interval`.
    poll_interval: float = 0.05
    fast_poll_period: float = 2.0
    max_poll_interval: float = 0.5


class SwarmPuller:
    def __init__(
        self,
        resolver: CredentialResolver,
        engine: SwarmEngine,
        settings: SwarmPullSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._resolver = resolver
        self._engine = engine
        self._settings = settings or SwarmPullSettings()
        self._clock = clock
        self._sleep = sleep

    def is_available(self) -> bool:
        return self._engine.is_swarm_manager()

    def pull(
        self,
        image: str,
        constraint_texts: Sequence[str],
        include_registry_auth: bool,
        actor: Actor,
        is_active: Callable[[], bool],
        time_remaining: float | None,
    ) -> Iterator[NodeOutcome | SwarmPullOutcome]:
        constraints = parse_constraints(constraint_texts)
        resolution = self._resolver.resolve(image, actor)
        if not self._engine.is_swarm_manager():
            raise FailedPrecondition(
                "the configured Docker engine is not an active Swarm manager",
                reason="NOT_A_SWARM_MANAGER",
            )
        now = self._clock()
        # The broker's own bound reports unfinished nodes as FAILED; the call's
        # deadline, when it comes first, ends the call instead (DEADLINE_EXCEEDED).
        deadline = now + self._settings.timeout
        call_deadline = now + time_remaining if time_remaining is not None else None
        all_nodes = self._engine.nodes()
        nodes = [
            n for n in all_nodes if n.ready and n.active and all(c.matches(n) for c in constraints)
        ]
        if not nodes:
            raise FailedPrecondition(
                "no ready, active Swarm node matches the placement constraints",
                reason="NO_ELIGIBLE_NODE",
            )
        reference = resolution.reference
        digest = self._engine.resolve_digest(reference.fully_qualified, resolution.auth_config())
        if not digest:
            raise FailedPrecondition(
                f"the registry named no digest for {reference.fully_qualified}",
                reason="PULL_FAILED",
            )
        pinned = f"{reference.name}@{digest}"
        outcomes: list[NodeOutcome] = []
        local = self._engine.local_node_id()
        to_pull = []
        for node in nodes:
            if node.id == local and self._engine.has_image(pinned):
                outcome = NodeOutcome(node.id, node.hostname, NodeState.ALREADY_PRESENT)
                outcomes.append(outcome)
                yield outcome
            else:
                to_pull.append(node)
        if to_pull:
            wanted = {n.id for n in to_pull}
            excluded = sorted(n.id for n in all_nodes if n.id not in wanted)
            pulls = self._prepull(
                pinned, resolution.registry_auth(), to_pull, excluded, deadline, is_active
            )
            for outcome in pulls:
                outcomes.append(outcome)
                yield outcome
            if not is_active():
                # Raised, not returned: the call's record must say it did not finish.
                if call_deadline is not None and self._clock() >= call_deadline - _CLOCK_SLACK:
                    raise DeadlineExceeded(
                        "the call's deadline passed before every node had the image"
                    )
                raise Cancelled("the caller cancelled the pull")
        yield SwarmPullOutcome(
            image=reference.fully_qualified,
            name=reference.name,
            digest=digest,
            image_host=resolution.host.name if resolution.host and not resolution.anonymous else "",
            nodes=tuple(outcomes),
            registry_auth=(
                self._resolver.disclose_registry_auth(resolution, actor)
                if include_registry_auth
                else EMPTY_SECRET
            ),
        )

    def _prepull(
        self,
        pinned: str,
        registry_auth: str,
        nodes: Sequence[SwarmNode],
        excluded: Sequence[str],
        deadline: float,
        is_active: Callable[[], bool],
    ) -> Iterator[NodeOutcome]:
        # Leftovers of a broker that died mid-pull: no pull lives longer than the timeout.
        self._engine.remove_stale_prepulls(older_than=2 * self._settings.timeout)
        pending = {n.id: n for n in nodes}
        # The service's own constraints are node ids, not the caller's: Swarm then runs it
        # on exactly the nodes chosen here, whatever it would make of the constraints.
        service = self._engine.start_prepull(
            pinned,
            Secret(registry_auth),
            [f"node.id!={node_id}" for node_id in excluded],
            {PREPULL_LABEL: "true"},
        )
        started = self._clock()
        interval = self._settings.poll_interval
        last_seen: dict[str, PrepullTask] = {}
        try:
            while pending and is_active():
                for task in self._engine.prepull_tasks(service):
                    last_seen[task.node_id] = task
                    state = judge(task)
                    node = pending.get(task.node_id)
                    if state is None or node is None:
                        continue
                    del pending[task.node_id]
                    reason = "" if state is NodeState.PULLED else _reason_of(task)
                    yield NodeOutcome(node.id, node.hostname, state, reason)
                now = self._clock()
                for node_id in list(pending):
                    task_of_node = last_seen.get(node_id)
                    # No task, or one Swarm cannot place (say, no manifest for the node's
                    # platform): it will not get further by waiting.
                    unscheduled = now - started > self._settings.schedule_grace and (
                        task_of_node is None or task_of_node.state == "pending"
                    )
                    if now >= deadline or unscheduled:
                        node = pending.pop(node_id)
                        yield NodeOutcome(
                            node.id,
                            node.hostname,
                            NodeState.FAILED,
                            _timeout_reason(task_of_node, unscheduled=unscheduled),
                        )
                if pending:
                    self._sleep(interval)
                    if self._clock() - started > self._settings.fast_poll_period:
                        interval = min(interval * 1.5, self._settings.max_poll_interval)
        finally:
            self._engine.remove_prepull(service)


#: Said after the engine's words when a node could not pull: the credentials were
#: good on the manager (it resolved the digest with them), so look at the node.
NODE_PULL_HINT = (
    " (the credentials worked on the manager: check that this node reaches the registry "
    "and trusts its certificate, or is allowed plain HTTP to it)"
)


def _reason_of(task: PrepullTask) -> str:
    words = (task.error or task.message or f"the task ended {task.state}")[:500]
    return words + NODE_PULL_HINT if words.startswith("No such image") else words


def _timeout_reason(task: PrepullTask | None, *, unscheduled: bool) -> str:
    if task is None:
        if unscheduled:
            return "the Swarm scheduled no pre-pull task on this node"
        return "timed out before the Swarm scheduled a pre-pull task on this node"
    if unscheduled:
        detail = task.error or task.message
        return "the Swarm could not place the pre-pull task on this node" + (
            f": {detail}" if detail else ""
        )
    detail = task.error or task.message
    return f"timed out with the pre-pull task {task.state}" + (f": {detail}" if detail else "")
