"""The read-through cache: freshness, background refresh, outages, writes, copies, shutdown.

Time is an injected clock; threads meet on events; every wait is bounded.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from broker.core.audit import Actor, discard_audit
from broker.core.errors import Unavailable
from broker.core.image_hosts import HostFields, ImageHostCatalog
from broker.stores.base import (
    Check,
    CommitResult,
    Delete,
    Entry,
    Operation,
    Put,
    StoreCorrupt,
    StoreUnavailable,
    VersionConflict,
)
from broker.stores.cache import CachedStore, StoreHealth
from broker.stores.memory import MemoryStore

TTL = 10.0
WINDOW = 100.0
WAIT = 5.0  # upper bound of every wait: a broken cache fails, it does not hang
TOKEN = "fake-token-cache-0123"  # fake value only
REFRESHER = "credbroker-store-refresh"

_T = TypeVar("_T")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """A MemoryStore that counts calls, can be down, and can hold reads on a gate."""

    def __init__(self, inner: MemoryStore | None = None) -> None:
        self.inner = inner or MemoryStore()
        self.down: str | None = None  # when set: every call raises StoreUnavailable(down)
        self.corrupt = False  # when set: reads raise StoreCorrupt
        self.gate: threading.Event | None = None  # when set: reads wait for it
        self.entered = threading.Event()  # a read reached the gate
        self.gate_timed_out = False
        self.hold_next_commit: threading.Event | None = None  # the next commit waits for it
        self.commit_entered = threading.Event()
        self.calls: collections.Counter[str] = collections.Counter()
        self.closed = False
        self._lock = threading.Lock()

    def _read_call(self, name: str, read: Callable[[], _T]) -> _T:
        with self._lock:
            self.calls[name] += 1
        answer = read()  # read first, then wait: the answer may be outdated by then
        gate = self.gate
        if gate is not None:
            self.entered.set()
            if not gate.wait(WAIT):
                self.gate_timed_out = True
                raise AssertionError("the test never opened the gate")
        if self.down is not None:
            raise StoreUnavailable(self.down)
        if self.corrupt:
            raise StoreCorrupt("cannot decrypt")
        return answer

    def get(self, key: str) -> Entry | None:
        return self._read_call("get", lambda: self.inner.get(key))

    def list(self, prefix: str) -> list[Entry]:
        return self._read_call("list", lambda: self.inner.list(prefix))

    def commit(self, operations: Sequence[Operation]) -> CommitResult:
        with self._lock:
            self.calls["commit"] += 1
            hold, self.hold_next_commit = self.hold_next_commit, None
        if self.down is not None:
            raise StoreUnavailable(self.down)
        result = self.inner.commit(operations)
        if hold is not None:  # applied, but the answer is slow to come back
            self.commit_entered.set()
            if not hold.wait(WAIT):
                self.gate_timed_out = True
                raise AssertionError("the test never released the commit")
        return result

    def close(self) -> None:
        self.closed = True

    def reads(self) -> int:
        return self.calls["get"] + self.calls["list"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def cache(backend: FakeBackend, clock: FakeClock) -> Iterator[CachedStore]:
    store = CachedStore(backend, ttl=TTL, stale_window=WINDOW, clock=clock)
    try:
        yield store
    finally:
        if backend.gate is not None:
            backend.gate.set()
        store.close()
    assert not backend.gate_timed_out


@pytest.fixture
def store_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="credbroker.store")
    return caplog


def seed(backend: FakeBackend, key: str, data: dict[str, Any]) -> int:
    """Write straight to the shared backend: another replica's write."""
    current = backend.inner.get(key)
    version = 0 if current is None else current.version
    return backend.inner.commit([Put(key, data, version)]).versions[key]


def value(entry: Entry | None) -> Any:
    assert entry is not None
    return entry.data["v"]


def store_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "credbroker.store"]


# -- freshness -------------------------------------------------------------------


def test_fresh_hits_do_not_touch_the_backend(
    cache: CachedStore, backend: FakeBackend, clock: FakeClock
) -> None:
    seed(backend, "hosts/a", {"v": 1})
    assert value(cache.get("hosts/a")) == 1
    assert [e.key for e in cache.list("hosts/")] == ["hosts/a"]
    assert cache.get("hosts/missing") is None
    reads = backend.reads()
    assert reads == 3

    clock.advance(TTL - 0.01)
    for _ in range(5):
        assert value(cache.get("hosts/a")) == 1
        assert [e.key for e in cache.list("hosts/")] == ["hosts/a"]
        assert cache.get("hosts/missing") is None  # absence is cached too
    assert backend.reads() == reads
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.refreshes) == (15, 3, 0)


def test_stale_entry_is_served_at_once_while_one_background_refresh_runs(
    cache: CachedStore, backend: FakeBackend, clock: FakeClock
) -> None:
    seed(backend, "k", {"v": 1})
    assert value(cache.get("k")) == 1
    seed(backend, "k", {"v": 2})
    clock.advance(TTL + 1)
    backend.gate = threading.Event()  # the backend is now slow: reads block

    callers = 8
    with ThreadPoolExecutor(callers) as pool:
        answers = [f.result(WAIT) for f in [pool.submit(cache.get, "k") for _ in range(callers)]]
    # Every caller got the stale value while the refresh was still held at the gate.
    assert [value(a) for a in answers] == [1] * callers
    assert backend.entered.wait(WAIT)
    assert not backend.gate.is_set()
    assert backend.calls["get"] == 2  # the first read, then one refresh for all callers

    backend.gate.set()
    assert cache.wait_idle(WAIT)
    assert value(cache.get("k")) == 2  # refreshed, and now fresh again
    assert backend.calls["get"] == 2
    assert cache.stats().refreshes == 1


def test_stale_list_is_refreshed_once_in_the_background(
    cache: CachedStore, backend: FakeBackend, clock: FakeClock
) -> None:
    seed(backend, "hosts/a", {"v": 1})
    assert len(cache.list("hosts/")) == 1
    seed(backend, "hosts/b", {"v": 1})
    clock.advance(TTL)
    backend.gate = threading.Event()
    assert len(cache.list("hosts/")) == 1
    assert len(cache.list("hosts/")) == 1
    assert backend.entered.wait(WAIT)
    backend.gate.set()
    assert cache.wait_idle(WAIT)
    assert [e.key for e in cache.list("hosts/")] == ["hosts/a", "hosts/b"]
    assert backend.calls["list"] == 2


def test_cold_misses_share_one_backend_read(cache: CachedStore, backend: FakeBackend) -> None:
    seed(backend, "k", {"v": 1})
    backend.gate = threading.Event()
    callers = 8
    with ThreadPoolExecutor(callers) as pool:
        futures = [pool.submit(cache.get, "k") for _ in range(callers)]
        assert backend.entered.wait(WAIT)
        assert not any(f.done() for f in futures)  # nothing cached: they must wait
        backend.gate.set()
        assert [value(f.result(WAIT)) for f in futures] == [1] * callers
    assert backend.calls["get"] == 1


def test_entry_older_than_the_stale_window_is_read_synchronously(
    cache: CachedStore, backend: FakeBackend, clock: FakeClock
) -> None:
    seed(backend, "k", {"v": 1})
    assert value(cache.get("k")) == 1
    seed(backend, "k", {"v": 2})
    clock.advance(WINDOW)
    assert value(cache.get("k")) == 2
    assert backend.calls["get"] == 2
    assert cache.stats().refreshes == 0


def test_change_by_another_replica_is_seen_within_the_ttl(
    backend: FakeBackend, clock: FakeClock
) -> None:
    one = CachedStore(backend, ttl=TTL, stale_window=WINDOW, clock=clock)
    two = CachedStore(backend, ttl=TTL, stale_window=WINDOW, clock=clock)
    try:
        one.commit([Put("hosts/a", {"v": 1}, 0)])
        assert value(two.get("hosts/a")) == 1
        assert [value(e) for e in two.list("hosts/")] == [1]

        one.commit([Put("hosts/a", {"v": 2}, 1)])
        assert value(one.get("hosts/a")) == 2  # the writer sees its write at once
        clock.advance(TTL / 2)
        assert value(two.get("hosts/a")) == 1  # the other replica: not yet, it is fresh

        clock.advance(TTL / 2)
        # Past the TTL: served stale once while the refresh runs, then the change.
        assert value(two.get("hosts/a")) == 1
        assert [value(e) for e in two.list("hosts/")] == [1]
        assert two.wait_idle(WAIT)
        assert value(two.get("hosts/a")) == 2
        assert [value(e) for e in two.list("hosts/")] == [2]

        # A delete through one replica likewise.
        one.commit([Delete("hosts/a", 2)])
        clock.advance(WINDOW)  # idle for long: the next read is synchronous
        assert two.get("hosts/a") is None
        assert two.list("hosts/") == []
    finally:
        one.close()
        two.close()


# -- outages ---------------------------------------------------------------------


def test_outage_within_the_window_serves_cached_entries_and_reports_degraded(
    cache: CachedStore,
    backend: FakeBackend,
    clock: FakeClock,
    store_log: pytest.LogCaptureFixture,
) -> None:
    seed(backend, "hosts/a", {"v": 1, "access_token": TOKEN})
    assert value(cache.get("hosts/a")) == 1
    assert len(cache.list("hosts/")) == 1
    assert cache.get("hosts/none") is None
    assert cache.health() == StoreHealth("ok", None, "the secret store answers")

    backend.down = "vault: connection refused"
    clock.advance(TTL + 1)
    outage_start = clock.now
    for _ in range(3):
        assert value(cache.get("hosts/a")) == 1
        assert len(cache.list("hosts/")) == 1
        assert cache.get("hosts/none") is None
        assert cache.wait_idle(WAIT)
        clock.advance(2)

    health = cache.health()
    assert health.state == "degraded"
    assert health.since == outage_start
    assert "connection refused" in health.detail
    assert TOKEN not in health.detail
    lines = store_lines(store_log)
    assert len(lines) == 1, lines
    assert "degraded" in lines[0]
    assert TOKEN not in store_log.text


def test_outage_beyond_the_window_raises_unavailable(
    cache: CachedStore,
    backend: FakeBackend,
    clock: FakeClock,
    store_log: pytest.LogCaptureFixture,
) -> None:
    seed(backend, "k", {"v": 1})
    assert value(cache.get("k")) == 1
    backend.down = "vault: connection refused"
    clock.advance(WINDOW - 1)
    assert value(cache.get("k")) == 1
    assert cache.wait_idle(WAIT)
    assert cache.health().state == "degraded"

    clock.advance(1)
    with pytest.raises(StoreUnavailable, match="connection refused"):
        cache.get("k")
    health = cache.health()
    assert health.state == "unavailable"
    assert "nothing cached" in health.detail
    cache.health()
    lines = store_lines(store_log)
    assert len(lines) == 2, lines  # entering degraded, then past the stale window


def test_absent_key_during_an_outage_raises_unavailable(
    cache: CachedStore, backend: FakeBackend
) -> None:
    seed(backend, "k", {"v": 1})
    assert value(cache.get("k")) == 1
    backend.down = "vault: 503"
    with pytest.raises(StoreUnavailable, match="503"):
        cache.get("never-read")
    with pytest.raises(StoreUnavailable):
        cache.list("hosts/")
    assert value(cache.get("k")) == 1  # what it holds, it still serves
    assert cache.health().state == "degraded"


def test_outage_before_any_answer_is_unavailable_not_degraded(
    cache: CachedStore, backend: FakeBackend
) -> None:
    backend.down = "vault: no route to host"
    with pytest.raises(StoreUnavailable):
        cache.get("k")
    assert cache.health().state == "unavailable"


def test_recovers_by_itself_when_the_backend_answers_again(
    cache: CachedStore,
    backend: FakeBackend,
    clock: FakeClock,
    store_log: pytest.LogCaptureFixture,
) -> None:
    seed(backend, "k", {"v": 1})
    assert value(cache.get("k")) == 1
    backend.down = "vault: sealed"
    clock.advance(TTL)
    assert value(cache.get("k")) == 1
    assert cache.wait_idle(WAIT)
    assert cache.health().state == "degraded"

    backend.down = None
    seed(backend, "k", {"v": 2})
    clock.advance(5)  # past the retry interval of the failed refresh
    assert value(cache.get("k")) == 1  # still stale: this read starts the refresh
    assert cache.wait_idle(WAIT)
    assert value(cache.get("k")) == 2
    assert cache.health() == StoreHealth("ok", None, "the secret store answers")
    cache.health()
    lines = store_lines(store_log)
    assert len(lines) == 2, lines
    assert "degraded" in lines[0]
    assert "answers again" in lines[1]
    assert [r.levelname for r in store_log.records] == ["WARNING", "INFO"]


def test_failed_refreshes_are_retried_after_an_interval_not_on_every_call(
    cache: CachedStore, backend: FakeBackend, clock: FakeClock
) -> None:
    seed(backend, "k", {"v": 1})
    assert value(cache.get("k")) == 1
    backend.down = "vault: timeout"
    clock.advance(TTL)
    for _ in range(5):
        assert value(cache.get("k")) == 1
        assert cache.wait_idle(WAIT)
    assert backend.calls["get"] == 2
    clock.advance(1.0)  # the default retry interval
    assert value(cache.get("k")) == 1
    assert cache.wait_idle(WAIT)
    assert backend.calls["get"] == 3


def test_other_refresh_failures_drop_the_entry(
    cache: CachedStore, backend: FakeBackend, clock: FakeClock
) -> None:
    seed(backend, "k", {"v": 1})
    assert value(cache.get("k")) == 1
    backend.corrupt = True
    clock.advance(TTL)
    assert value(cache.get("k")) == 1  # the refresh fails in the background
    assert cache.wait_idle(WAIT)
    with pytest.raises(StoreCorrupt):
        cache.get("k")  # not served around a corrupt store
    assert cache.health().state == "ok"


def test_catalog_over_the_cache_during_an_outage(
    cache: CachedStore, backend: FakeBackend, clock: FakeClock
) -> None:
    catalog = ImageHostCatalog(cache, discard_audit)
    actor = Actor(principal="alice", peer="ipv4:127.0.0.1:1")
    catalog.create("quay", HostFields(url="quay.io", username="robot"), actor)
    assert catalog.get("quay", actor).username == "robot"
    assert [h.id for h in catalog.all_hosts()] == ["quay"]
    backend.down = "vault: connection refused"
    clock.advance(TTL + 1)
    assert catalog.get("quay", actor).username == "robot"
    assert [h.id for h in catalog.all_hosts()] == ["quay"]
    with pytest.raises(Unavailable) as info:
        catalog.get("ghcr", actor)
    assert info.value.reason == "STORE_UNAVAILABLE"
    assert "connection refused" in str(info.value)


# -- writes ----------------------------------------------------------------------


def test_commit_writes_through_and_updates_the_cache(
    cache: CachedStore, backend: FakeBackend
) -> None:
    assert cache.get("hosts/a") is None
    assert cache.list("hosts/") == []
    assert cache.list("claims/") == []
    reads = backend.reads()

    result = cache.commit([Put("hosts/a", {"v": 1}, 0)])
    assert dict(result.versions) == {"hosts/a": 1}
    assert backend.inner.get("hosts/a") == Entry("hosts/a", {"v": 1}, 1)
    assert cache.get("hosts/a") == Entry("hosts/a", {"v": 1}, 1)  # no backend read
    assert backend.reads() == reads
    assert cache.list("claims/") == []  # a list that cannot contain it stays cached
    assert backend.reads() == reads
    assert [e.key for e in cache.list("hosts/")] == ["hosts/a"]  # this one was dropped
    assert backend.reads() == reads + 1

    cache.commit([Put("hosts/a", {"v": 2}, 1), Put("hosts/b", {"v": 1}, 0)])
    assert cache.get("hosts/a") == Entry("hosts/a", {"v": 2}, 2)
    cache.commit([Delete("hosts/a", 2)])
    assert cache.get("hosts/a") is None
    assert cache.get("hosts/b") == Entry("hosts/b", {"v": 1}, 1)
    assert backend.reads() == reads + 1
    assert [e.key for e in cache.list("hosts/")] == ["hosts/b"]
    assert cache.list("") == backend.inner.list("")


def test_failed_commit_is_not_acknowledged_and_the_entry_is_revalidated(
    cache: CachedStore, backend: FakeBackend
) -> None:
    cache.commit([Put("k", {"v": 1}, 0)])
    backend.down = "vault: connection reset"
    with pytest.raises(StoreUnavailable):
        cache.commit([Put("k", {"v": 2}, 1)])
    assert value(cache.get("k")) == 1  # outcome unknown: old value only as a fallback
    assert cache.stats().fallbacks == 1
    backend.down = None
    reads = backend.reads()
    assert value(cache.get("k")) == 1  # revalidated with the backend first
    assert backend.reads() == reads + 1
    assert backend.inner.get("k") == Entry("k", {"v": 1}, 1)


def test_version_conflict_invalidates_the_conflicting_key(
    cache: CachedStore, backend: FakeBackend
) -> None:
    seed(backend, "k", {"v": 1})
    assert cache.get("k") == Entry("k", {"v": 1}, 1)
    seed(backend, "k", {"v": 2})  # another replica
    with pytest.raises(VersionConflict):
        cache.commit([Put("k", {"v": "mine"}, 1)])
    assert cache.get("k") == Entry("k", {"v": 2}, 2)  # read again, not the stale copy
    assert backend.calls["get"] == 2


def test_conflict_on_a_checked_key_invalidates_it(cache: CachedStore, backend: FakeBackend) -> None:
    seed(backend, "default", {"v": "a"})
    assert value(cache.get("default")) == "a"
    seed(backend, "default", {"v": "b"})
    with pytest.raises(VersionConflict):
        cache.commit([Put("hosts/x", {"v": 1}, 0), Check("default", 1)])
    assert value(cache.get("default")) == "b"


def test_cached_absence_is_invalidated_by_a_conflict(
    cache: CachedStore, backend: FakeBackend
) -> None:
    assert cache.get("hosts/a") is None
    assert cache.list("hosts/") == []
    seed(backend, "hosts/a", {"v": "theirs"})
    with pytest.raises(VersionConflict):
        cache.commit([Put("hosts/a", {"v": "mine"}, 0)])
    assert value(cache.get("hosts/a")) == "theirs"
    assert [value(e) for e in cache.list("hosts/")] == ["theirs"]


def test_a_read_overtaken_by_a_write_does_not_cache_the_old_value(
    cache: CachedStore, backend: FakeBackend
) -> None:
    seed(backend, "k", {"v": 1})
    backend.gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        slow_read = pool.submit(cache.get, "k")
        assert backend.entered.wait(WAIT)
        cache.commit([Put("k", {"v": 2}, 1)])
        # The read returns what it saw; the write wins in the cache.
        backend.gate.set()
        assert value(slow_read.result(WAIT)) == 1
    assert cache.get("k") == Entry("k", {"v": 2}, 2)


def test_concurrent_writers_never_move_the_cache_backwards(
    cache: CachedStore, backend: FakeBackend
) -> None:
    threads, rounds = 4, 20
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait(WAIT)
        for _ in range(rounds):
            while True:
                current = cache.get("n")
                version = 0 if current is None else current.version
                try:
                    cache.commit([Put("n", {"v": version + 1}, version)])
                    break
                except VersionConflict:
                    continue

    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(work) for _ in range(threads)]:
            done.result(30)
    assert cache.get("n") == Entry("n", {"v": threads * rounds}, threads * rounds)


@pytest.mark.parametrize("late", ["put", "delete"])
def test_a_late_commit_answer_does_not_move_the_cache_backwards(
    cache: CachedStore, backend: FakeBackend, late: str
) -> None:
    cache.commit([Put("k", {"v": 1}, 0)])
    hold = backend.hold_next_commit = threading.Event()
    late_op: Operation = Put("k", {"v": 2}, 1) if late == "put" else Delete("k", 1)
    expected = Entry("k", {"v": 3}, 3 if late == "put" else 2)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(cache.commit, [late_op])
        assert backend.commit_entered.wait(WAIT)  # applied in the backend, answer pending
        # A later write answers first.
        cache.commit([Put("k", {"v": 3}, 2 if late == "put" else 0)])
        hold.set()
        slow.result(WAIT)
    assert cache.get("k") == expected
    assert backend.calls["get"] == 0


# -- copies and bounds ------------------------------------------------------------


def test_returned_and_committed_data_are_copies(
    cache: CachedStore, backend: FakeBackend, clock: FakeClock
) -> None:
    data: dict[str, Any] = {"access_token": TOKEN, "nested": {"list": [1]}}
    cache.commit([Put("k", data, 0)])
    data["nested"]["list"].append("caller")
    original = {"access_token": TOKEN, "nested": {"list": [1]}}

    got: Any = cache.get("k")
    got.data["nested"]["list"].append("got")
    listed: Any = cache.list("")
    listed[0].data["access_token"] = "changed"
    listed.clear()
    assert cache.get("k") == Entry("k", original, 1)
    assert cache.list("") == [Entry("k", original, 1)]

    clock.advance(TTL)  # the stale path
    stale: Any = cache.get("k")
    stale.data.clear()
    assert cache.wait_idle(WAIT)
    assert cache.get("k") == Entry("k", original, 1)


def test_cache_is_bounded_least_recently_used_first(backend: FakeBackend, clock: FakeClock) -> None:
    cache = CachedStore(backend, ttl=TTL, stale_window=WINDOW, clock=clock, max_entries=2)
    try:
        for key in ("a", "b", "c"):
            seed(backend, key, {"v": key})
        cache.get("a")
        cache.get("b")
        cache.get("a")  # b is now the least recently used
        cache.get("c")
        assert cache.stats().keys == 2
        reads = backend.reads()
        cache.get("a")
        cache.get("c")
        assert backend.reads() == reads
        cache.get("b")
        assert backend.reads() == reads + 1
    finally:
        cache.close()


@pytest.mark.parametrize(
    ("ttl", "window", "extra"),
    [
        (-1.0, 10.0, {}),
        (10.0, 5.0, {}),
        (1.0, 10.0, {"max_entries": 0}),
        (1.0, 10.0, {"refresh_threads": 0}),
        (1.0, 10.0, {"retry_interval": -1.0}),
    ],
)
def test_rejects_inconsistent_settings(ttl: float, window: float, extra: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        CachedStore(MemoryStore(), ttl=ttl, stale_window=window, **extra)


# -- shutdown --------------------------------------------------------------------


def refreshers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(REFRESHER)]


def test_close_stops_the_refreshers_and_closes_the_backend(
    backend: FakeBackend, clock: FakeClock
) -> None:
    assert refreshers() == []
    cache = CachedStore(backend, ttl=TTL, stale_window=WINDOW, clock=clock, refresh_threads=2)
    for key in ("a", "b", "c"):
        seed(backend, key, {"v": key})
        cache.get(key)
    clock.advance(TTL)
    for key in ("a", "b", "c"):
        cache.get(key)
    assert cache.wait_idle(WAIT)
    assert 1 <= len(refreshers()) <= 2

    cache.close()
    assert refreshers() == []
    assert backend.closed
    with pytest.raises(StoreUnavailable, match="closed"):
        cache.get("a")
    with pytest.raises(StoreUnavailable, match="closed"):
        cache.commit([Put("d", {"v": 1}, 0)])
    assert cache.health().state == "unavailable"
    cache.close()  # twice is fine


def test_close_waits_for_a_running_refresh_and_cancels_queued_ones(
    backend: FakeBackend, clock: FakeClock
) -> None:
    cache = CachedStore(backend, ttl=TTL, stale_window=WINDOW, clock=clock, refresh_threads=1)
    for key in ("a", "b"):
        seed(backend, key, {"v": key})
        cache.get(key)
    clock.advance(TTL)
    backend.gate = threading.Event()
    cache.get("a")  # its refresh runs and blocks at the gate
    assert backend.entered.wait(WAIT)
    cache.get("b")  # its refresh is queued behind
    with ThreadPoolExecutor(1) as pool:
        closing = pool.submit(cache.close)
        assert not closing.done()
        backend.gate.set()
        closing.result(WAIT)
    assert refreshers() == []
    assert backend.calls["get"] == 3  # two first reads, one refresh; the queued one never ran
    assert backend.closed
    assert not backend.gate_timed_out
