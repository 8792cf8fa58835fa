"""The audit trail: one JSON object per line, appended, never a secret."""

from __future__ import annotations

import json
import threading
from typing import TextIO

from broker.core.audit import AuditEvent


class JsonLinesAudit:
    """An AuditSink writing JSON lines to a stream (stderr or an append-mode file)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: AuditEvent) -> None:
        line = json.dumps(
            {
                "time": event.time.isoformat(),
                "audit": event.action,
                "principal": event.actor.principal,
                "peer": event.actor.peer,
                "resource": event.resource,
                "outcome": event.outcome,
                **event.details,
            },
            sort_keys=False,
        )
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
