"""The background reconciler: keeps managed pull secrets current without being asked.

One thread per broker process. It runs `PullSecretManager.sync` once at start
(catching up with whatever changed while the broker was down), then every
`interval` seconds, and at once whenever `trigger()` is called: the server
registers `trigger` as an observer of the image-host catalog, so a host whose
credentials change (or that is deleted) reaches every managed secret that
carries it right away; such a run reads and writes only those secrets. Triggers
that arrive during a run are coalesced into one more run.

Several replicas may reconcile the same cluster at the same time: every write
is a no-op when the content is already right (UNCHANGED, no request beyond
the reads) and guarded by resourceVersion otherwise, so they never undo one
another's work, and records are created with compare-and-set.

A change made through another replica is picked up on the next interval (the
observer only sees this process's writes). An interval of 0 turns the periodic
runs off; triggers still work. `stop()` ends the thread: a run in progress
finishes its current requests (each is bounded by the adapter's timeouts).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from broker.core.audit import SYSTEM_ACTOR
from broker.core.errors import BrokerError
from broker.core.pull_secrets import NamespaceOutcome, PullSecretManager

_log = logging.getLogger("credbroker.pullsecrets")

DEFAULT_INTERVAL = 60.0


class PullSecretReconciler:
    def __init__(
        self,
        manager: PullSecretManager,
        interval: float = DEFAULT_INTERVAL,
        *,
        on_run: Callable[[list[NamespaceOutcome]], None] | None = None,
    ) -> None:
        if interval < 0:
            raise ValueError("the sync interval must not be negative")
        self._manager = manager
        self._interval = interval
        self._on_run = on_run
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: Hosts changed since the last run was started; None: every secret is due.
        self._changed: set[str] | None = set()
        self._thread = threading.Thread(target=self._run, name="pullsecret-sync", daemon=True)
        self.runs = 0

    def start(self) -> None:
        self._thread.start()

    def trigger(self, image_host_id: str = "") -> None:
        """Run again as soon as possible (an observer of the image-host catalog): for the
        secrets that carry `image_host_id` only, or all of them when it is empty."""
        with self._lock:
            if not image_host_id:
                self._changed = None
            elif self._changed is not None:
                self._changed.add(image_host_id)
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run_once(self, carrying: frozenset[str] | None = None) -> list[NamespaceOutcome]:
        """One sync (of the secrets `carrying` these hosts, or all); failures are
        logged, never raised (the thread must live on)."""
        try:
            outcomes = self._manager.sync(SYSTEM_ACTOR, strict=False, carrying=carrying)
        except BrokerError as exc:
            _log.warning("pull-secret sync failed: %s (%s)", exc.message, exc.reason)
            return []
        except Exception as exc:  # noqa: BLE001 - a bug must not end the reconciler
            _log.error("pull-secret sync failed unexpectedly: %s", type(exc).__name__)
            return []
        finally:
            self.runs += 1
        _report(outcomes)
        if self._on_run is not None:
            self._on_run(outcomes)
        return outcomes

    def _run(self) -> None:
        self.run_once()
        while not self._stop.is_set():
            woken = self._wake.wait(self._interval or None)
            self._wake.clear()
            if self._stop.is_set():
                break
            with self._lock:
                # A credential change rewrites the secrets that carry the host, not
                # the whole cluster; the interval still repairs everything.
                changed = self._changed if woken else None
                self._changed = set()
            self.run_once(None if changed is None else frozenset(changed))


def _report(outcomes: list[NamespaceOutcome]) -> None:
    changed = [o for o in outcomes if o.changed]
    failed = [o for o in outcomes if o.failed]
    for outcome in failed:
        errors = [outcome.error] if outcome.error is not None else []
        errors += [a.error for a in outcome.service_accounts if a.error is not None]
        for error in errors:
            _log.warning(
                "pull secret %s/%s: %s: %s",
                outcome.namespace,
                outcome.secret_name,
                error.reason,
                error.message,
            )
    if changed or failed:
        _log.info(
            "pull-secret sync: %d checked, %d changed, %d failed",
            len(outcomes),
            len(changed),
            len(failed),
        )
