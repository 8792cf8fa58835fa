"""A read-through cache in front of any SecretStore (file or Vault).

Reads (`get`, `list`) are answered from memory while they are fresh (younger
than `ttl`). An answer older than `ttl` but younger than `stale_window` is still
served at once, and one background refresh (single flight per key or prefix)
fetches it again: hot lookups never wait on the backend. Only an answer that is
absent, older than `stale_window`, or in doubt (a write of it failed with an
unknown outcome) is fetched synchronously; concurrent callers share that fetch.

When the backend raises StoreUnavailable, a cached answer younger than
`stale_window` is served (degraded mode, reported by `health()` and logged once
on entering and once on leaving); anything else propagates the StoreUnavailable.

Writes always go to the backend. After a successful commit the cache holds the
written keys at their new versions (a Delete caches "absent"), and cached lists
that could contain them are dropped. After a failed commit, every key the batch
may have changed (and the key that conflicted) is dropped, or, when the outcome
is unknown (StoreUnavailable), kept only as a degraded-mode fallback.

Another writer's change (another replica, another process) is seen within `ttl`
plus the time of one refresh. Absent keys are cached as well, with the same TTL.
Every answer is a deep copy. `max_entries` bounds each of the two tables (keys,
list prefixes), least recently used first out. Times are in `clock` units.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from broker.stores.base import (
    CommitResult,
    Delete,
    Entry,
    Operation,
    Put,
    SecretStore,
    StoreError,
    StoreUnavailable,
    VersionConflict,
)

_log = logging.getLogger("credbroker.store")

HealthState = Literal["ok", "degraded", "unavailable"]

_V = TypeVar("_V")

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_REFRESH_THREADS = 4
DEFAULT_RETRY_INTERVAL = 1.0
DEFAULT_CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class StoreHealth:
    """How the store behind the cache is doing.

    `since` is when the backend was first seen unavailable in the current outage
    (in the cache's clock units), None while the state is "ok".
    """

    state: HealthState
    since: float | None
    detail: str


@dataclass(frozen=True)
class CacheStats:
    hits: int  # fresh answers from memory
    stale_hits: int  # stale answers from memory while a refresh runs
    misses: int  # synchronous backend reads
    refreshes: int  # background refreshes started
    fallbacks: int  # answers from memory because the backend was unavailable
    keys: int  # cached keys (absent ones included)
    lists: int  # cached list prefixes


@dataclass
class _Slot(Generic[_V]):
    value: _V
    # Entry version; for a cached absence the version it was deleted at (0 if unknown).
    version: int
    fetched_at: float  # clock when the read (or write) that produced it started
    doubtful: bool = False  # a write failed with an unknown outcome: revalidate first
    retry_at: float = float("-inf")  # no background refresh before this (after a failure)


class _Flight(Generic[_V]):
    """One backend read of one key or prefix, shared by every caller that needs it."""

    def __init__(self) -> None:
        self.future: Future[_V] = Future()
        self.claimed = False  # somebody runs it (a refresher or a caller)
        self.poisoned = False  # a local write overtook it: do not cache its answer


class _Table(Generic[_V]):
    def __init__(
        self,
        fetch: Callable[[str], _V],
        clone: Callable[[_V], _V],
        version_of: Callable[[_V], int],
    ) -> None:
        self.fetch = fetch
        self.clone = clone
        self.version_of = version_of
        self.slots: collections.OrderedDict[str, _Slot[_V]] = collections.OrderedDict()
        self.flights: dict[str, _Flight[_V]] = {}

    def end(self, name: str, flight: _Flight[_V]) -> None:
        if self.flights.get(name) is flight:
            del self.flights[name]

    def detach(self, name: str) -> None:
        flight = self.flights.pop(name, None)
        if flight is not None:
            flight.poisoned = True


def _clone_entry(entry: Entry | None) -> Entry | None:
    return None if entry is None else Entry(entry.key, copy.deepcopy(entry.data), entry.version)


def _clone_entries(entries: list[Entry]) -> list[Entry]:
    return [Entry(e.key, copy.deepcopy(e.data), e.version) for e in entries]


def _entry_version(entry: Entry | None) -> int:
    return 0 if entry is None else entry.version


class CachedStore:
    """A SecretStore that caches another one; see the module documentation."""

    def __init__(
        self,
        backend: SecretStore,
        *,
        ttl: float,
        stale_window: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        refresh_threads: int = DEFAULT_REFRESH_THREADS,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if ttl < 0:
            raise ValueError("ttl must not be negative")
        if stale_window < ttl:
            raise ValueError("stale_window must be at least ttl")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if refresh_threads < 1:
            raise ValueError("refresh_threads must be at least 1")
        if retry_interval < 0 or close_timeout < 0:
            raise ValueError("retry_interval and close_timeout must not be negative")
        self._backend = backend
        self._ttl = ttl
        self._stale_window = stale_window
        self._clock = clock
        self._max_entries = max_entries
        self._refresh_threads = refresh_threads
        self._retry_interval = retry_interval
        self._close_timeout = close_timeout

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # jobs queued or finished, closing
        self._gets: _Table[Entry | None] = _Table(backend.get, _clone_entry, _entry_version)
        self._lists: _Table[list[Entry]] = _Table(backend.list, _clone_entries, lambda _: 0)
        # Background refreshes to run: (table, key or prefix).
        self._jobs: collections.deque[tuple[_Table[Any], str]] = collections.deque()
        self._pending = 0  # background refreshes queued or running
        self._idle = 0  # refresher threads waiting for a job
        self._workers: list[threading.Thread] = []
        self._closed = False

        self._last_ok: float | None = None  # the backend last answered at
        self._outage_since: float | None = None
        self._outage_detail = ""
        self._reported: HealthState = "ok"
        self._hits = self._stale_hits = self._misses = self._refreshes = self._fallbacks = 0

    # -- SecretStore ---------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        return self._read(self._gets, key)

    def list(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with `prefix`, in key order."""
        return self._read(self._lists, prefix)

    def commit(self, operations: Sequence[Operation]) -> CommitResult:
        ops = list(operations)
        written = list(dict.fromkeys(op.key for op in ops if isinstance(op, Put | Delete)))
        with self._lock:
            self._check_open()
        started = self._clock()
        try:
            result = self._backend.commit(ops)
        except VersionConflict as exc:
            self._note_ok()
            # A store that applies batches in order (Vault) may have applied the
            # operations before the conflict; the conflicting key changed elsewhere.
            self._invalidate([*written, exc.key], keep_fallback=False)
            raise
        except StoreUnavailable as exc:
            self._note_unavailable(exc)
            # Unknown outcome: revalidate before trusting, but keep as a fallback.
            self._invalidate(written, keep_fallback=True)
            raise
        except BaseException:
            self._invalidate(written, keep_fallback=False)
            raise
        self._note_ok()
        self._apply(ops, result, started)
        return result

    def close(self) -> None:
        """Stop the refreshers (waiting up to `close_timeout`), then close the backend."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cancelled = list(self._jobs)
            self._jobs.clear()
            self._pending -= len(cancelled)
            closing = StoreUnavailable("the secret store is closing")
            for table, name in cancelled:
                flight = table.flights.get(name)
                if flight is not None and not flight.claimed:
                    flight.claimed = True
                    table.end(name, flight)
                    flight.future.set_exception(closing)
            self._changed.notify_all()
            workers = list(self._workers)
        deadline = time.monotonic() + self._close_timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(worker.is_alive() for worker in workers)
        if stuck:
            _log.warning(
                "%d secret store refresh(es) still running after %gs; closing the store anyway",
                stuck,
                self._close_timeout,
            )
        with self._lock:
            self._gets.slots.clear()
            self._lists.slots.clear()
        self._backend.close()

    # -- beyond SecretStore ---------------------------------------------------

    def health(self) -> StoreHealth:
        now = self._clock()
        with self._lock:
            if self._closed:
                return StoreHealth("unavailable", self._outage_since, "the secret store is closed")
            if self._outage_since is None:
                return StoreHealth("ok", None, "the secret store answers")
            message = self._update_state(now)
            outage = now - self._outage_since
            if self._reported == "degraded":
                detail = (
                    f"the secret store has been unavailable for {outage:.0f}s "
                    f"({self._outage_detail}); serving cached entries up to "
                    f"{self._stale_window:g}s old"
                )
            else:
                detail = (
                    f"the secret store has been unavailable for {outage:.0f}s "
                    f"({self._outage_detail}); nothing cached is recent enough to serve"
                )
            health = StoreHealth(self._reported, self._outage_since, detail)
        if message:
            _log.warning("%s", message)
        return health

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                stale_hits=self._stale_hits,
                misses=self._misses,
                refreshes=self._refreshes,
                fallbacks=self._fallbacks,
                keys=len(self._gets.slots),
                lists=len(self._lists.slots),
            )

    def invalidate(self, keys: Iterable[str]) -> None:
        """Forget `keys` and the cached lists that could contain them."""
        self._invalidate(list(keys), keep_fallback=False)

    def probe(self, key: str) -> None:
        """During an outage, read `key` from the backend once to notice that it is back.

        The health watch calls it: once nothing cached is recent enough, callers
        are turned away (health "" NOT_SERVING), and no read would find out.
        """
        with self._lock:
            if self._closed or self._outage_since is None:
                return
        try:
            self._backend.get(key)
        except StoreUnavailable as exc:
            self._note_unavailable(exc)
        except StoreError:
            pass  # it answers but refuses: the calls themselves say why
        else:
            self._note_ok()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no background refresh is queued or running; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pending == 0, timeout)

    # -- reads ---------------------------------------------------------------

    def _read(self, table: _Table[_V], name: str) -> _V:
        now = self._clock()
        with self._lock:
            self._check_open()
            slot = table.slots.get(name)
            age = None if slot is None or slot.doubtful else now - slot.fetched_at
            if slot is not None and age is not None and age < self._stale_window:
                table.slots.move_to_end(name)
                if age < self._ttl:
                    self._hits += 1
                else:
                    self._stale_hits += 1
                    if name not in table.flights and now >= slot.retry_at:
                        self._queue_refresh(table, name)
                cached = slot.value
                flight = None
            else:
                flight = table.flights.get(name)
                run = flight is None or not flight.claimed
                if flight is None:
                    flight = table.flights[name] = _Flight()
                if run:
                    flight.claimed = True  # a queued refresh is taken over, not waited for
                    self._misses += 1
        if flight is not None:
            return self._await(table, name, flight, run)
        return table.clone(cached)

    def _await(self, table: _Table[_V], name: str, flight: _Flight[_V], run: bool) -> _V:
        if run:
            self._fetch(table, name, flight)
        try:
            value = flight.future.result()
        except StoreUnavailable:
            now = self._clock()
            with self._lock:
                slot = table.slots.get(name)
                usable = slot is not None and now - slot.fetched_at < self._stale_window
                if slot is None or not usable:
                    raise
                self._fallbacks += 1
                value = slot.value
        return table.clone(value)

    def _fetch(self, table: _Table[_V], name: str, flight: _Flight[_V]) -> None:
        """Read `name` from the backend, cache the answer, and settle `flight`."""
        started = self._clock()
        try:
            value = table.fetch(name)
        except StoreUnavailable as exc:
            self._note_unavailable(exc)
            with self._lock:
                table.end(name, flight)
                slot = table.slots.get(name)
                if slot is not None and not flight.poisoned:
                    slot.retry_at = started + self._retry_interval
            flight.future.set_exception(exc)
            return
        except BaseException as exc:
            # StoreCorrupt, permission denied, a bug: never keep serving around it.
            with self._lock:
                table.end(name, flight)
                if not flight.poisoned:
                    table.slots.pop(name, None)
            flight.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._note_ok()
        with self._lock:
            table.end(name, flight)
            if not flight.poisoned and not self._closed:
                self._install(table, name, value, table.version_of(value), started)
        flight.future.set_result(value)

    def _install(self, table: _Table[_V], name: str, value: _V, version: int, at: float) -> None:
        table.slots[name] = _Slot(value, version, at)
        table.slots.move_to_end(name)
        while len(table.slots) > self._max_entries:
            table.slots.popitem(last=False)

    # -- background refresh ------------------------------------------------------

    def _queue_refresh(self, table: _Table[_V], name: str) -> None:
        """Under the lock: start one background refresh of `name`."""
        table.flights[name] = _Flight()
        self._jobs.append((table, name))
        self._pending += 1
        self._refreshes += 1
        if len(self._jobs) > self._idle and len(self._workers) < self._refresh_threads:
            worker = threading.Thread(
                target=self._work,
                name=f"credbroker-store-refresh-{len(self._workers) + 1}",
                daemon=True,  # a backend call stuck past close() must not block exit
            )
            self._workers.append(worker)
            worker.start()
        self._changed.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._idle += 1
                    self._changed.wait()
                    self._idle -= 1
                if self._closed:
                    return
                table, name = self._jobs.popleft()
                flight = table.flights.get(name)
                run = flight is not None and not flight.claimed
                if flight is not None and run:
                    flight.claimed = True
            try:
                if flight is not None and run:
                    self._fetch(table, name, flight)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._changed.notify_all()

    # -- writes ------------------------------------------------------------------

    def _apply(self, ops: Sequence[Operation], result: CommitResult, started: float) -> None:
        final: dict[str, Put | Delete] = {}
        for op in ops:
            if isinstance(op, Put | Delete):
                final[op.key] = op
        with self._lock:
            for key, op in final.items():
                self._forget_lists(key)
                self._gets.detach(key)
                version = result.versions.get(key)
                slot = self._gets.slots.get(key)
                if isinstance(op, Put) and version is not None and version > 0:
                    # The same JSON round trip as the stores: the same types come back.
                    data = json.loads(json.dumps(dict(op.data)))
                    if slot is None or slot.version <= version:
                        self._install(self._gets, key, Entry(key, data, version), version, started)
                elif isinstance(op, Delete) and version == 0:
                    # Never overwrite a newer version cached by a concurrent write.
                    if slot is None or slot.version <= op.expected_version:
                        self._install(self._gets, key, None, op.expected_version, started)
                else:
                    self._gets.slots.pop(key, None)

    def _invalidate(self, keys: Sequence[str], *, keep_fallback: bool) -> None:
        with self._lock:
            for key in keys:
                self._gets.detach(key)
                if keep_fallback:
                    slot = self._gets.slots.get(key)
                    if slot is not None:
                        slot.doubtful = True
                else:
                    self._gets.slots.pop(key, None)
                self._forget_lists(key, keep_fallback=keep_fallback)

    def _forget_lists(self, key: str, *, keep_fallback: bool = False) -> None:
        """Under the lock: drop (or doubt) the cached lists that could contain `key`."""
        for prefix in [p for p in self._lists.slots if key.startswith(p)]:
            if keep_fallback:
                self._lists.slots[prefix].doubtful = True
            else:
                del self._lists.slots[prefix]
        for prefix in [p for p in self._lists.flights if key.startswith(p)]:
            self._lists.detach(prefix)

    # -- health ------------------------------------------------------------------

    def _note_ok(self) -> None:
        now = self._clock()
        with self._lock:
            self._last_ok = now
            if self._outage_since is None:
                return
            outage, previous = now - self._outage_since, self._reported
            self._outage_since = None
            self._outage_detail = ""
            self._reported = "ok"
        _log.info(
            "the secret store answers again after %.1fs (was %s); back to normal", outage, previous
        )

    def _note_unavailable(self, exc: StoreUnavailable) -> None:
        now = self._clock()
        with self._lock:
            if self._outage_since is None:
                self._outage_since = now
            self._outage_detail = str(exc)
            message = self._update_state(now)
        if message:
            _log.warning("%s", message)

    def _update_state(self, now: float) -> str:
        """Under the lock, during an outage: the state now, and a log line if it changed."""
        recent = self._last_ok is not None and now - self._last_ok < self._stale_window
        state: HealthState = "degraded" if recent else "unavailable"
        if state == self._reported:
            return ""
        self._reported = state
        if state == "degraded":
            return (
                f"the secret store is unavailable ({self._outage_detail}); entering degraded "
                f"mode: serving cached entries up to {self._stale_window:g}s old"
            )
        return (
            f"the secret store is unavailable ({self._outage_detail}) and nothing cached is "
            f"recent enough to serve (stale window {self._stale_window:g}s)"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the secret store is closed")
