"""An in-process store with the file store's semantics, for unit tests and tools."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

from broker.stores.base import CommitResult, Entry, Operation, apply_operations


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Any] = {}
        self._retired: dict[str, int] = {}

    def get(self, key: str) -> Entry | None:
        with self._lock:
            raw = self._entries.get(key)
            if raw is None:
                return None
            return Entry(key, copy.deepcopy(raw["data"]), int(raw["version"]))

    def list(self, prefix: str) -> list[Entry]:
        with self._lock:
            return [
                Entry(k, copy.deepcopy(v["data"]), int(v["version"]))
                for k, v in sorted(self._entries.items())
                if k.startswith(prefix)
            ]

    def commit(self, operations: Sequence[Operation]) -> CommitResult:
        with self._lock:
            return CommitResult(apply_operations(self._entries, self._retired, operations))

    def close(self) -> None:
        pass
