"""Copy every entry from one store to another, verify, and resume safely.

The source is only read. Each entry is written to the target with
compare-and-set: an entry already there with the same data (from an earlier,
interrupted run) is skipped, a different one stops the migration unless the
caller asks to overwrite. Then every entry is read back and compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broker.stores.base import Put, SecretStore, StoreError


class MigrationError(StoreError):
    """The target disagrees with the source; nothing was overwritten."""


@dataclass(frozen=True)
class MigrationReport:
    copied: int
    already_present: int
    overwritten: int
    verified: int


def _order(key: str) -> tuple[int, str]:
    # Hosts before the claims and the default that point at them: a reader of
    # a half-migrated target never sees a pointer to a missing host.
    rank = 0 if key.startswith("hosts/") else 2 if key == "default" else 1
    return rank, key


def migrate(
    source: SecretStore,
    target: SecretStore,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda key: None,
) -> MigrationReport:
    entries = sorted(source.list(""), key=lambda e: _order(e.key))
    copied = present = overwritten = 0
    for entry in entries:
        existing = target.get(entry.key)
        if existing is None:
            target.commit([Put(entry.key, entry.data, 0)])
            copied += 1
        elif existing.data == entry.data:
            present += 1
        elif overwrite:
            target.commit([Put(entry.key, entry.data, existing.version)])
            overwritten += 1
        else:
            raise MigrationError(
                f"the target already holds {entry.key!r} with different content; "
                "nothing was overwritten (use --overwrite to replace it)"
            )
        progress(entry.key)
    for entry in entries:
        copy = target.get(entry.key)
        if copy is None or copy.data != entry.data:
            raise MigrationError(f"verification failed: {entry.key!r} differs in the target")
    return MigrationReport(copied, present, overwritten, verified=len(entries))
