"""Who did what: the principal behind a call and the audit events it causes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Actor:
    """The authenticated principal of a call and where it came from."""

    principal: str
    peer: str = ""
    #: Image host ids this actor may use; empty means every host.
    image_hosts: frozenset[str] = frozenset()

    def may_use_host(self, image_host_id: str) -> bool:
        return not self.image_hosts or image_host_id in self.image_hosts


SYSTEM_ACTOR = Actor(principal="system:credbroker")


@dataclass(frozen=True)
class AuditEvent:
    action: str
    actor: Actor
    resource: str
    outcome: str = "OK"
    details: Mapping[str, str] = field(default_factory=dict)
    time: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


AuditSink = Callable[[AuditEvent], None]


def discard_audit(event: AuditEvent) -> None:
    """An AuditSink for tools that record nothing."""
