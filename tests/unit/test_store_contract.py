"""The SecretStore contract, run against every store implementation.

Each store is one `StoreKind` in `STORE_KINDS`. The Vault kind runs on the
session's Vault (the emulator, or a real Vault when VAULT_ADDR is set), each test
under a fresh prefix. Vault has no transactions: it applies a batch in order and,
on a conflict, restores what the batch had changed, with new versions. So for it
(`atomic_batches=False`) the all-or-nothing tests compare the data, not the
version numbers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.stores.base import (
    Check,
    CommitResult,
    Delete,
    Entry,
    InvalidKey,
    Operation,
    Put,
    SecretStore,
    StoreError,
    VersionConflict,
)
from broker.stores.cache import CachedStore
from broker.stores.file import FileStore
from broker.stores.memory import MemoryStore
from tests.support.vault_target import VaultTarget

# Fake values only: nothing here is a real credential.
TOKEN = "fake-token-0123456789"


@dataclass(frozen=True)
class StoreKind:
    name: str
    #: Opens a store in a test's tmp_path; None: on the session's Vault (the
    #: emulator, or a real Vault with VAULT_ADDR), under a fresh prefix.
    open: Callable[[Path], SecretStore] | None
    atomic_batches: bool = True


STORE_KINDS = [
    StoreKind("memory", lambda _tmp: MemoryStore()),
    StoreKind("file", lambda tmp: FileStore(tmp / "file-store")),
    StoreKind("cached-memory", lambda _tmp: CachedStore(MemoryStore(), ttl=60, stale_window=600)),
    StoreKind("vault", None, atomic_batches=False),
]


@pytest.fixture(params=STORE_KINDS, ids=lambda kind: kind.name)
def store_kind(request: pytest.FixtureRequest) -> StoreKind:
    kind: StoreKind = request.param
    return kind


@pytest.fixture
def store(
    store_kind: StoreKind, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[SecretStore]:
    if store_kind.open is None:
        vault: VaultTarget = request.getfixturevalue("vault")
        opened: SecretStore = vault.store()
    else:
        opened = store_kind.open(tmp_path)
    try:
        yield opened
    finally:
        opened.close()


def snapshot(store: SecretStore) -> list[tuple[str, int, dict[str, Any]]]:
    return [(e.key, e.version, dict(e.data)) for e in store.list("")]


def contents(store: SecretStore) -> list[tuple[str, dict[str, Any]]]:
    return [(e.key, dict(e.data)) for e in store.list("")]


def put(store: SecretStore, key: str, data: dict[str, Any], expected: int = 0) -> int:
    return store.commit([Put(key, data, expected)]).versions[key]


# -- reads ---------------------------------------------------------------------


def test_get_missing_returns_none(store: SecretStore) -> None:
    assert store.get("hosts/nope") is None
    assert store.list("") == []


def test_get_after_delete_returns_none(store: SecretStore) -> None:
    put(store, "k", {"a": 1})
    store.commit([Delete("k", 1)])
    assert store.get("k") is None
    assert store.list("") == []


# -- put -------------------------------------------------------------------------


def test_put_expected_zero_creates_version_1(store: SecretStore) -> None:
    data = {"username": "robot", "access_token": TOKEN, "n": 3, "ok": True, "none": None}
    result = store.commit([Put("hosts/a", data, 0)])
    assert isinstance(result, CommitResult)
    assert dict(result.versions) == {"hosts/a": 1}
    entry = store.get("hosts/a")
    assert entry == Entry("hosts/a", data, 1)


def test_put_with_current_version_increments(store: SecretStore) -> None:
    put(store, "k", {"v": 1})
    assert put(store, "k", {"v": 2}, 1) == 2
    assert put(store, "k", {"v": 3}, 2) == 3
    entry = store.get("k")
    assert entry is not None
    assert (entry.version, dict(entry.data)) == (3, {"v": 3})


def test_nested_and_unicode_data_round_trip(store: SecretStore) -> None:
    data = {"list": [1, "two", {"three": [3.5]}], "text": 'grüße ✓ "quoted"\n', "empty": {}}
    put(store, "k", data)
    entry = store.get("k")
    assert entry is not None
    assert entry.data == data


@pytest.mark.parametrize("wrong", [0, 2, 7, -1])
def test_put_with_wrong_expected_version_conflicts_and_changes_nothing(
    store: SecretStore, wrong: int
) -> None:
    put(store, "k", {"access_token": TOKEN})
    before = snapshot(store)
    with pytest.raises(VersionConflict) as info:
        store.commit([Put("k", {"access_token": "other-fake"}, wrong)])
    assert (info.value.key, info.value.expected, info.value.actual) == ("k", wrong, 1)
    assert isinstance(info.value, StoreError)
    leaked = TOKEN in str(info.value) or "other-fake" in str(info.value)
    assert not leaked, "a VersionConflict message contains a stored value"
    assert snapshot(store) == before


def test_put_on_missing_key_with_nonzero_version_conflicts(store: SecretStore) -> None:
    with pytest.raises(VersionConflict) as info:
        store.commit([Put("k", {"v": 1}, 1)])
    assert (info.value.expected, info.value.actual) == (1, 0)
    assert store.get("k") is None


# -- batches ---------------------------------------------------------------------


def _seed_for_batch(store: SecretStore) -> None:
    put(store, "update-me", {"v": "old"})
    put(store, "delete-me", {"v": "doomed"})
    put(store, "checked", {"v": "c"})


FAILING_LAST_OPS: dict[str, Operation] = {
    "check-wrong-version": Check("checked", 5),
    "check-absent-but-exists": Check("checked", 0),
    "check-missing-key": Check("never-written", 1),
    "put-wrong-version": Put("checked", {"v": "x"}, 3),
    "put-create-existing": Put("checked", {"v": "x"}, 0),
    "delete-wrong-version": Delete("checked", 2),
}


@pytest.mark.parametrize("failing", list(FAILING_LAST_OPS.values()), ids=list(FAILING_LAST_OPS))
def test_batch_is_all_or_nothing(
    store_kind: StoreKind, store: SecretStore, failing: Operation
) -> None:
    _seed_for_batch(store)
    before = snapshot(store)
    before_contents = contents(store)
    batch: list[Operation] = [
        Put("created", {"v": "new"}, 0),
        Put("update-me", {"v": "new"}, 1),
        Delete("delete-me", 1),
        Put("created", {"v": "newer"}, 1),  # sees the earlier op of the same batch
        failing,
    ]
    with pytest.raises(VersionConflict) as info:
        store.commit(batch)
    assert info.value.key == failing.key
    assert store.get("created") is None
    assert contents(store) == before_contents
    if not store_kind.atomic_batches:
        return  # restored with new versions: what follows needs the old ones
    assert snapshot(store) == before
    # Nothing half-applied either: the same batch without the failing op works
    # from the untouched versions.
    result = store.commit(batch[:-1])
    assert dict(result.versions) == {"created": 2, "update-me": 2, "delete-me": 0}


def test_conflict_in_the_middle_of_a_batch_applies_nothing(
    store_kind: StoreKind, store: SecretStore
) -> None:
    _seed_for_batch(store)
    state = snapshot if store_kind.atomic_batches else contents
    before = state(store)
    with pytest.raises(VersionConflict):
        store.commit(
            [
                Put("a", {"v": 1}, 0),
                Check("checked", 9),
                Put("b", {"v": 1}, 0),
            ]
        )
    assert state(store) == before


def test_operations_in_a_batch_see_earlier_ones(store: SecretStore) -> None:
    result = store.commit([Put("k", {"v": 1}, 0), Check("k", 1), Put("k", {"v": 2}, 1)])
    assert dict(result.versions) == {"k": 2}
    entry = store.get("k")
    assert entry is not None
    assert (entry.version, dict(entry.data)) == (2, {"v": 2})


def test_empty_batch_changes_nothing(store: SecretStore) -> None:
    put(store, "k", {"v": 1})
    before = snapshot(store)
    assert dict(store.commit([]).versions) == {}
    assert snapshot(store) == before


# -- delete and version history ---------------------------------------------------


def test_delete_then_put_continues_versions(store: SecretStore) -> None:
    seen: list[int] = [put(store, "k", {"v": 1}), put(store, "k", {"v": 2}, 1)]
    assert dict(store.commit([Delete("k", 2)]).versions) == {"k": 0}
    assert store.get("k") is None
    seen.append(put(store, "k", {"v": 3}))
    assert store.commit([Delete("k", 3)]).versions["k"] == 0
    seen.append(put(store, "k", {"v": 4}))
    assert seen == [1, 2, 3, 4]
    entry = store.get("k")
    assert entry is not None
    assert (entry.version, dict(entry.data)) == (4, {"v": 4})


def test_delete_and_recreate_in_one_batch_continues_versions(store: SecretStore) -> None:
    put(store, "k", {"v": 1})
    result = store.commit([Delete("k", 1), Put("k", {"v": 2}, 0)])
    assert dict(result.versions) == {"k": 2}


def test_old_version_never_matches_a_recreated_key(store: SecretStore) -> None:
    put(store, "k", {"v": 1})
    store.commit([Delete("k", 1)])
    put(store, "k", {"v": 2})  # version 2, not 1 again
    for stale in (Put("k", {"v": "stale"}, 1), Check("k", 1), Delete("k", 1)):
        with pytest.raises(VersionConflict):
            store.commit([stale])
    entry = store.get("k")
    assert entry is not None
    assert (entry.version, dict(entry.data)) == (2, {"v": 2})


def test_delete_with_wrong_version_conflicts(store: SecretStore) -> None:
    put(store, "k", {"v": 1})
    with pytest.raises(VersionConflict):
        store.commit([Delete("k", 2)])
    assert store.get("k") is not None


@pytest.mark.parametrize("history", ["never-written", "deleted-before"])
def test_delete_of_absent_key_is_a_clean_outcome(store: SecretStore, history: str) -> None:
    """Delete(key, 0) of an absent key either succeeds as a no-op or conflicts.

    It must not escape as a KeyError (an INTERNAL error at the API).
    """
    if history == "deleted-before":
        put(store, "k", {"v": 1})
        store.commit([Delete("k", 1)])
    put(store, "other", {"v": 1})
    before = snapshot(store)
    with contextlib.suppress(VersionConflict):
        store.commit([Delete("k", 0)])
    assert snapshot(store) == before
    assert put(store, "k", {"v": 9}) == (1 if history == "never-written" else 2)


# -- list ------------------------------------------------------------------------


def test_list_returns_matching_keys_in_key_order(store: SecretStore) -> None:
    keys = ["hosts/b", "default", "hosts/a", "hostsx", "claims/zz", "hosts/a-1", "hosts/a/x", "h"]
    for i, key in enumerate(keys):
        put(store, key, {"i": i})
    put(store, "hosts/b", {"i": 99}, 1)

    listed = store.list("hosts/")
    assert [e.key for e in listed] == ["hosts/a", "hosts/a-1", "hosts/a/x", "hosts/b"]
    assert [e.version for e in listed] == [1, 1, 1, 2]
    assert [e.data["i"] for e in listed] == [2, 5, 6, 99]
    assert [e.key for e in store.list("")] == sorted(keys)
    assert [e.key for e in store.list("claims/")] == ["claims/zz"]
    assert store.list("nothing/") == []
    assert [e.key for e in store.list("hosts/a")] == ["hosts/a", "hosts/a-1", "hosts/a/x"]


@pytest.mark.parametrize("key", ["", "hosts/", "/hosts", "hosts//a", "a b", "k\n"])
def test_keys_vault_could_not_hold_are_refused_everywhere(store: SecretStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.commit([Put(key, {"v": 1}, 0)])
    assert store.list("") == []


# -- copies ----------------------------------------------------------------------


def test_returned_data_are_copies(store: SecretStore) -> None:
    original = {"access_token": TOKEN, "nested": {"list": [1, 2]}}
    put(store, "k", {"access_token": TOKEN, "nested": {"list": [1, 2]}})

    got = store.get("k")
    assert got is not None
    got_data: Any = got.data
    got_data["access_token"] = "changed"
    got_data["nested"]["list"].append(3)
    got_data["added"] = True

    listed: Any = store.list("")[0].data
    listed["nested"]["list"].clear()
    listed.pop("access_token")

    again = store.get("k")
    assert again is not None
    unchanged = again.data == original and store.list("k")[0].data == original
    assert unchanged, "mutating returned data changed the store"


def test_committed_data_are_copied(store: SecretStore) -> None:
    """Mutating the caller's dict (even nested parts) after commit changes nothing."""
    data: dict[str, Any] = {"access_token": TOKEN, "nested": {"list": [1, 2]}}
    put(store, "k", data)
    data["access_token"] = "changed"
    data["nested"]["list"].append(3)
    data["nested"]["extra"] = 1

    entry = store.get("k")
    assert entry is not None
    unchanged = entry.data == {"access_token": TOKEN, "nested": {"list": [1, 2]}}
    assert unchanged, "mutating the committed input changed the stored data"


# -- check -----------------------------------------------------------------------


def test_check_ops_change_nothing(store: SecretStore) -> None:
    put(store, "a", {"v": 1})
    put(store, "b", {"v": 1})
    put(store, "b", {"v": 2}, 1)
    before = snapshot(store)
    result = store.commit([Check("a", 1), Check("b", 2), Check("missing", 0)])
    assert dict(result.versions) == {}
    assert snapshot(store) == before
    assert store.get("missing") is None
    # Versions did not move either.
    assert put(store, "a", {"v": 2}, 1) == 2


def test_failed_check_changes_nothing(store: SecretStore) -> None:
    put(store, "a", {"v": 1})
    before = snapshot(store)
    with pytest.raises(VersionConflict) as info:
        store.commit([Check("a", 0)])
    assert (info.value.key, info.value.expected, info.value.actual) == ("a", 0, 1)
    assert snapshot(store) == before


# -- commit result ---------------------------------------------------------------


def test_commit_result_versions(store: SecretStore) -> None:
    put(store, "update", {"v": 1})
    put(store, "update", {"v": 2}, 1)
    put(store, "delete", {"v": 1})
    put(store, "check", {"v": 1})
    result = store.commit(
        [
            Put("create", {"v": 1}, 0),
            Put("update", {"v": 3}, 2),
            Delete("delete", 1),
            Check("check", 1),
        ]
    )
    # Puts report their new version, deletes 0, checks nothing.
    assert dict(result.versions) == {"create": 1, "update": 3, "delete": 0}
    assert [(e.key, e.version) for e in store.list("")] == [
        ("check", 1),
        ("create", 1),
        ("update", 3),
    ]


# -- concurrency -----------------------------------------------------------------

THREADS = 4
INCREMENTS = 15
MAX_ATTEMPTS = 500


def cas_increment(store: SecretStore, key: str) -> int:
    """Increment a counter with compare-and-set; returns the conflicts seen."""
    for attempt in range(MAX_ATTEMPTS):
        entry = store.get(key)
        version = 0 if entry is None else entry.version
        value = 0 if entry is None else int(entry.data["n"])
        try:
            store.commit([Put(key, {"n": value + 1}, version)])
        except VersionConflict:
            continue
        return attempt
    raise AssertionError(f"no increment of {key} after {MAX_ATTEMPTS} attempts")


def test_concurrent_cas_increments_from_threads_lose_nothing(store: SecretStore) -> None:
    start = threading.Barrier(THREADS)

    def work(worker: int) -> None:
        start.wait(10)
        for i in range(INCREMENTS):
            cas_increment(store, "counter")
            put(store, f"t{worker}/{i:03}", {"worker": worker, "i": i})

    with ThreadPoolExecutor(THREADS) as pool:
        for done in [pool.submit(work, w) for w in range(THREADS)]:
            done.result(60)  # re-raises a worker's failure
    counter = store.get("counter")
    assert counter is not None
    assert counter.data["n"] == THREADS * INCREMENTS
    assert counter.version == THREADS * INCREMENTS
    assert len(store.list("t")) == THREADS * INCREMENTS
