"""The SecretStore contract shared by the embedded file store and Vault.

A store is a map from keys to small JSON objects, each with a version that
grows by one on every write. Every change is compare-and-set: an operation
names the version it expects (0: the key must not exist). `commit` applies a
batch of operations; the file store applies a batch atomically, Vault applies
it in order and stops at the first conflict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

JsonObject = Mapping[str, Any]


@dataclass(frozen=True)
class Entry:
    key: str
    data: JsonObject
    version: int


@dataclass(frozen=True)
class Put:
    """Write `data` at `key` if the key is at `expected_version` (0: absent)."""

    key: str
    data: JsonObject
    expected_version: int


@dataclass(frozen=True)
class Delete:
    """Remove `key` if it is at `expected_version`."""

    key: str
    expected_version: int


@dataclass(frozen=True)
class Check:
    """Change nothing, but fail the batch unless `key` is at `expected_version`."""

    key: str
    expected_version: int


Operation = Put | Delete | Check


@dataclass(frozen=True)
class CommitResult:
    versions: Mapping[str, int] = field(default_factory=dict)


class StoreError(Exception):
    """Base of store failures. Messages never contain stored values."""


class VersionConflict(StoreError):
    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(f"version conflict on {key!r}: expected {expected}, found {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual


class StoreUnavailable(StoreError):
    """The store cannot be reached or read right now; retrying may help."""


class StorePermissionDenied(StoreError):
    """The store refused the broker itself (e.g. a Vault policy lacks a capability)."""


class StoreCorrupt(StoreError):
    """The stored data cannot be decrypted or parsed. Never repaired automatically."""


class SecretStore(Protocol):
    def get(self, key: str) -> Entry | None: ...

    def list(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with `prefix`, in key order."""
        ...

    def commit(self, operations: Sequence[Operation]) -> CommitResult: ...

    def close(self) -> None: ...


@runtime_checkable
class Invalidating(Protocol):
    """A store that caches reads and can be told to forget some keys."""

    def invalidate(self, keys: Iterable[str]) -> None: ...


#: Keys are '/'-separated segments of [A-Za-z0-9._-]: nothing Vault would refuse
#: as a path (an empty segment, a trailing '/').
KEY_RE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


class InvalidKey(StoreError, ValueError):
    """A key outside KEY_RE: a programming error, refused by every store alike."""


def check_key(key: str) -> None:
    if not KEY_RE.fullmatch(key):
        raise InvalidKey(f"invalid store key {key!r}")


def apply_operations(
    entries: dict[str, Any], retired: dict[str, int], operations: Sequence[Operation]
) -> dict[str, int]:
    """Apply a batch to an in-memory map, all or nothing; returns new versions.

    `entries` maps key -> {"version": n, "data": {...}}; `retired` remembers the
    last version of deleted keys so that versions never repeat for a key, and an
    old etag can never match an object deleted and created again.
    """
    staged = dict(entries)
    staged_retired = dict(retired)
    versions: dict[str, int] = {}
    for op in operations:
        check_key(op.key)
        current = staged.get(op.key)
        actual = 0 if current is None else int(current["version"])
        if actual != op.expected_version:
            raise VersionConflict(op.key, op.expected_version, actual)
        if isinstance(op, Put):
            base = actual or staged_retired.pop(op.key, 0)
            # A JSON round trip: a deep copy, and the same types in every store.
            staged[op.key] = {"version": base + 1, "data": json.loads(json.dumps(dict(op.data)))}
            versions[op.key] = base + 1
        elif isinstance(op, Delete):
            if current is not None:  # Delete(key, 0) of an absent key: nothing to do
                del staged[op.key]
                staged_retired[op.key] = actual
            versions[op.key] = 0
    entries.clear()
    entries.update(staged)
    retired.clear()
    retired.update(staged_retired)
    return versions
