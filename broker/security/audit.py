"""The audit trail: one JSON object per line, appended, never a secret.

The security interceptor opens one record per audited call (who, from where,
which method and resource, outcome, status code); domain events raised during
the call (a default's reason, the previous default) are added to that record.
Events outside any call (seeding at start) get a line of their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import threading
from collections.abc import Iterator
from typing import TextIO

from broker.core.audit import AuditEvent

_current_call: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "audit_call", default=None
)


class AuditTrail:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, record: dict[str, str]) -> None:
        line = json.dumps({"time": dt.datetime.now(dt.UTC).isoformat(), **record})
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def __call__(self, event: AuditEvent) -> None:
        """The core's AuditSink."""
        record = _current_call.get()
        if record is not None:
            record.update(event.details)
            return
        self.write(
            {
                "audit": event.action,
                "principal": event.actor.principal,
                "peer": event.actor.peer,
                "resource": event.resource,
                "outcome": event.outcome,
                **event.details,
            }
        )

    @contextlib.contextmanager
    def call(self) -> Iterator[dict[str, str]]:
        """Collect domain details for the record of the current call."""
        details: dict[str, str] = {}
        token = _current_call.set(details)
        try:
            yield details
        finally:
            _current_call.reset(token)
