"""A separate OS process writing to a FileStore, driven by the integration tests.

Run from the repository root as `python -m tests.support.store_writer MODE DIR ...`.

- `concurrent DIR WORKER KEYS INCREMENTS`: prints `ready`, waits for a line on
  stdin, then commits KEYS distinct keys `w{WORKER}/{i}` and, interleaved,
  INCREMENTS compare-and-set increments of the shared key `counter` (retrying
  on VersionConflict, bounded). Prints `done {"conflicts": n}` and exits 0;
  exits 3 if an increment never succeeded.
- `crash DIR RUN`: prints `ready`, then commits batches
  [Put(`run{RUN}/{i}`), Put(`counter`)] one after the other and prints
  `ack run{RUN}/{i}` after each commit returned, until killed (bounded).

Only key names are printed, never stored values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from broker.stores.base import Put, VersionConflict
from broker.stores.file import FileStore

MAX_ATTEMPTS = 2000
MAX_CRASH_COMMITS = 100_000


def crash_value(key: str) -> dict[str, str]:
    """The (fake) data the crash writer stores at `key`."""
    return {"username": "robot", "access_token": f"fake-{key}"}


def _increment(store: FileStore, key: str) -> int:
    for attempt in range(MAX_ATTEMPTS):
        entry = store.get(key)
        version = 0 if entry is None else entry.version
        value = 0 if entry is None else int(entry.data["n"])
        try:
            store.commit([Put(key, {"n": value + 1}, version)])
        except VersionConflict:
            continue
        return attempt
    raise SystemExit(3)


def concurrent(directory: Path, worker: int, keys: int, increments: int) -> None:
    store = FileStore(directory)
    print("ready", flush=True)
    sys.stdin.readline()
    conflicts = 0
    for i in range(max(keys, increments)):
        if i < keys:
            store.commit([Put(f"w{worker}/{i:04}", {"worker": worker, "i": i}, 0)])
        if i < increments:
            conflicts += _increment(store, "counter")
    store.close()
    print("done " + json.dumps({"conflicts": conflicts}), flush=True)


def crash(directory: Path, run: int) -> None:
    store = FileStore(directory)
    print("ready", flush=True)
    for i in range(MAX_CRASH_COMMITS):
        key = f"run{run:03}/{i:05}"
        counter = store.get("counter")
        version = 0 if counter is None else counter.version
        value = 0 if counter is None else int(counter.data["n"])
        store.commit([Put(key, crash_value(key), 0), Put("counter", {"n": value + 1}, version)])
        print(f"ack {key}", flush=True)
    store.close()


def main(argv: list[str]) -> None:
    mode, directory, *rest = argv
    if mode == "concurrent":
        worker, keys, increments = (int(x) for x in rest)
        concurrent(Path(directory), worker, keys, increments)
    elif mode == "crash":
        (run,) = (int(x) for x in rest)
        crash(Path(directory), run)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
