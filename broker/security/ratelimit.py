"""Token buckets: a per-principal call rate, and a per-peer budget of failed logins."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    """One bucket per key, `burst` deep, refilled at `rate` per second.

    At most `max_keys` buckets are kept (least recently used dropped), so
    callers cycling through keys cannot grow memory without bound.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, now: float) -> float:
        level, stamp = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + (now - stamp) * self.rate)

    def take(self, key: str, cost: float = 1.0) -> bool:
        """Take `cost` from the key's bucket; False (and nothing taken) when it is short."""
        with self._lock:
            now = self._clock()
            level = self._level(key, now)
            allowed = level >= cost
            self._buckets[key] = (level - cost if allowed else level, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return allowed

    def give_back(self, key: str, cost: float = 1.0) -> None:
        """Return what `take` took (a reservation that was not needed)."""
        with self._lock:
            now = self._clock()
            self._buckets[key] = (min(self.burst, self._level(key, now) + cost), now)

    def has(self, key: str, cost: float = 1.0) -> bool:
        with self._lock:
            return self._level(key, self._clock()) >= cost

    def retry_after(self, key: str, cost: float = 1.0) -> float:
        with self._lock:
            missing = cost - self._level(key, self._clock())
            return max(0.0, missing / self.rate) if self.rate > 0 else float("inf")
