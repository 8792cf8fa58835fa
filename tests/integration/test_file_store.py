"""The embedded FileStore against real processes, signals, files and the CLI.

Secret values used here are random or obviously fake, and are only ever
compared through booleans so that a failure never prints them.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.stores.base import Check, Put, StoreCorrupt, StoreError, StoreUnavailable
from broker.stores.file import DATA_FILE, HEADER_SIZE, KEY_FILE, LOCK_FILE, MAGIC, FileStore
from tests.support.store_writer import crash_value

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROCESS_TIMEOUT = 60.0
SERVE_TIMEOUT = 20.0
QUICK_EXIT_SECONDS = 10.0


# -- helpers ---------------------------------------------------------------------


def start_writer(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.store_writer", *map(str, args)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_if_running(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


@contextlib.contextmanager
def writers(*argv: tuple[object, ...]) -> Iterator[list[subprocess.Popen[str]]]:
    """Start writer processes; on exit kill leftovers and close every pipe."""
    with contextlib.ExitStack() as stack:
        processes = []
        for args in argv:
            process = stack.enter_context(start_writer(*args))
            stack.callback(kill_if_running, process)  # runs before Popen.__exit__
            processes.append(process)
        yield processes


def read_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline()


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.tmp-*"))


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def new_store_with_secret(directory: Path) -> str:
    """A closed store holding one host with a random secret; returns the secret."""
    secret = secrets.token_urlsafe(32)
    store = FileStore(directory)
    try:
        store.commit(
            [
                Put("hosts/x", {"username": "robot", "access_token": secret}, 0),
                Put("default", {"image_host_id": "x"}, 0),
            ]
        )
    finally:
        store.close()
    return secret


def broker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}


# -- several processes at once ---------------------------------------------------

WORKERS = 3
KEYS_PER_WORKER = 60
INCREMENTS_PER_WORKER = 40


def test_processes_writing_at_once_lose_no_update(tmp_path: Path) -> None:
    data = tmp_path / "data"  # created by whichever worker comes first
    argv = [("concurrent", data, w, KEYS_PER_WORKER, INCREMENTS_PER_WORKER) for w in range(WORKERS)]
    with writers(*argv) as processes:
        for process in processes:
            line = read_line(process)
            assert line == "ready\n", f"worker did not start: {process.communicate(timeout=10)}"
        for process in processes:  # all start together
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [p.communicate(timeout=PROCESS_TIMEOUT) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert out.startswith("done "), (out, err)
    conflicts = sum(json.loads(out.split(" ", 1)[1])["conflicts"] for out, _ in outputs)

    store = FileStore(data)
    try:
        entries = {e.key: e for e in store.list("")}
    finally:
        store.close()
    expected = {f"w{w}/{i:04}" for w in range(WORKERS) for i in range(KEYS_PER_WORKER)}
    missing = sorted(expected - entries.keys())
    assert missing == [], f"lost writes ({conflicts} CAS conflicts seen)"
    wrong = [k for k in expected if entries[k].version != 1 or entries[k].data["i"] != int(k[-4:])]
    assert wrong == []
    counter = entries["counter"]
    total = WORKERS * INCREMENTS_PER_WORKER
    assert (counter.data["n"], counter.version) == (total, total), f"{conflicts} conflicts"
    assert set(entries) == expected | {"counter"}
    assert temporaries(data) == []


def test_two_stores_in_one_process_see_each_others_writes(tmp_path: Path) -> None:
    """Each FileStore caches the decrypted file; the cache must follow the file."""
    first, second = FileStore(tmp_path / "d"), FileStore(tmp_path / "d")
    try:
        for version in range(1, 6):
            writer, reader = (first, second) if version % 2 else (second, first)
            assert writer.get("k") == reader.get("k")  # both warm their caches
            writer.commit([Put("k", {"n": version}, version - 1)])
            entry = reader.get("k")
            assert entry is not None
            assert (entry.version, entry.data["n"]) == (version, version)
            assert [e.version for e in reader.list("")] == [version]
    finally:
        first.close()
        second.close()


# -- kill -9 while committing ----------------------------------------------------

KILLS = 20
MAX_KILL_DELAY = 0.12
FILLER_BYTES = 200_000  # makes every commit write a sizeable file


def test_sigkill_while_committing_loses_no_acknowledged_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = FileStore(data)
    try:
        store.commit([Put("filler", {"blob": "f" * FILLER_BYTES}, 0)])
    finally:
        store.close()
    key_bytes = (data / KEY_FILE).read_bytes()
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    acknowledged: set[str] = set()

    for run in range(KILLS):
        with writers(("crash", data, run)) as (process,):
            ready = read_line(process)
            if ready == "ready\n":
                time.sleep(rng.uniform(0.0, MAX_KILL_DELAY))
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            out, err = process.communicate(timeout=10)
        assert ready == "ready\n", f"writer failed to start: {err}"
        assert process.returncode == -signal.SIGKILL, err
        acknowledged.update(
            line.split()[1]
            for line in out.splitlines(keepends=True)
            if line.startswith("ack ") and line.endswith("\n")
        )

        context = f"after kill {run + 1} (seed {seed})"
        store = FileStore(data)  # opens and decrypts
        try:
            entries = {e.key: e for e in store.list("")}
        finally:
            store.close()
        assert temporaries(data) == [], context
        missing = sorted(acknowledged - entries.keys())
        assert missing == [], f"acknowledged writes lost {context}"
        wrong = [k for k in acknowledged if entries[k].data != crash_value(k)]
        assert wrong == [], f"acknowledged writes changed {context}"
        # Every batch wrote one run key and one increment: both or neither.
        written = sum(1 for k in entries if k.startswith("run"))
        counter = entries.get("counter")
        assert (counter.data["n"] if counter else 0) == written, f"half a batch {context}"
        assert len(entries["filler"].data["blob"]) == FILLER_BYTES, context
        assert (data / KEY_FILE).read_bytes() == key_bytes, context

    assert acknowledged, "no writer ever acknowledged a commit"


def test_half_written_temporary_is_removed_and_ignored(tmp_path: Path) -> None:
    """What a writer killed between creating and renaming its temporary leaves."""
    data = tmp_path / "data"
    new_store_with_secret(data)
    before = files(data)
    partial = before[DATA_FILE][: len(before[DATA_FILE]) // 2]
    (data / f"{DATA_FILE}.tmp-0123456789abcdef").write_bytes(partial)
    (data / f"{DATA_FILE}.tmp-fedcba9876543210").write_bytes(b"")

    store = FileStore(data)
    try:
        assert [e.key for e in store.list("")] == ["default", "hosts/x"]
    finally:
        store.close()
    assert temporaries(data) == []
    assert files(data) == before


def test_key_creation_leftover_is_removed_on_open(tmp_path: Path) -> None:
    """A creator killed between link() and unlink() leaves `store.key.tmp-*`.

    It holds a copy of the key; opening the store must clean it up like the
    data temporaries. FAILS until FileStore also removes key temporaries.
    """
    data = tmp_path / "data"
    new_store_with_secret(data)
    os.link(data / KEY_FILE, data / f"{KEY_FILE}.tmp-0123456789abcdef")
    FileStore(data).close()
    assert temporaries(data) == []


# -- files on disk ---------------------------------------------------------------


def test_key_file_and_directory_are_private_and_data_is_encrypted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = new_store_with_secret(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((data / DATA_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((data / LOCK_FILE).stat().st_mode) == 0o600
    blob = (data / DATA_FILE).read_bytes()
    assert blob.startswith(MAGIC)
    plain_text = [s for s in (secret, "robot", "hosts/x", "access_token") if s.encode() in blob]
    assert plain_text == [], "the data file holds plain text"
    found_secret = secret.encode() in (data / KEY_FILE).read_bytes()
    assert not found_secret


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "a" / "data"
    code = "import os, sys, pathlib\nos.umask(0)\nfrom broker.stores.file import FileStore\n"
    code += "FileStore(pathlib.Path(sys.argv[1])).close()\n"
    subprocess.run(
        [sys.executable, "-c", code, str(data)], cwd=ROOT, check=True, timeout=PROCESS_TIMEOUT
    )
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / KEY_FILE).stat().st_mode) == 0o600


def test_check_only_batch_does_not_rewrite_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_store_with_secret(data)
    before = files(data)
    store = FileStore(data)
    try:
        assert dict(store.commit([Check("hosts/x", 1), Check("nope", 0)]).versions) == {}
    finally:
        store.close()
    assert files(data) == before


# -- refusing a wrong key or a damaged file -------------------------------------


def _flip(offset: int) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        blob = bytearray((data / DATA_FILE).read_bytes())
        blob[offset] ^= 0x40
        (data / DATA_FILE).write_bytes(bytes(blob))

    return damage


def _truncate(keep: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        blob = (data / DATA_FILE).read_bytes()
        (data / DATA_FILE).write_bytes(blob[: keep(len(blob))])

    return damage


def _wrong_key(data: Path) -> None:
    # Another valid key; writing in place keeps mode 0600.
    (data / KEY_FILE).write_bytes(base64.b64encode(os.urandom(32)) + b"\n")


def _missing_key(data: Path) -> None:
    (data / KEY_FILE).unlink()


def _key_mode(mode: int) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        (data / KEY_FILE).chmod(mode)

    return damage


def _garbage_key(data: Path) -> None:
    (data / KEY_FILE).write_bytes(b"not a key\n")


# id -> (damage, fragments the error message must contain)
BAD_STORES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "wrong-key": (_wrong_key, ("different key", KEY_FILE)),
    "flipped-magic-byte": (_flip(0), ("damaged",)),
    "flipped-nonce-byte": (_flip(HEADER_SIZE - 1), ("damaged",)),
    "flipped-ciphertext-byte": (_flip(HEADER_SIZE + 5), ("damaged",)),
    "flipped-tag-byte": (_flip(-1), ("damaged",)),
    "truncated-to-half": (_truncate(lambda n: n // 2), ("damaged",)),
    "truncated-by-one": (_truncate(lambda n: n - 1), ("damaged",)),
    "truncated-into-header": (_truncate(lambda n: HEADER_SIZE - 3), ("damaged",)),
    "truncated-to-empty": (_truncate(lambda n: 0), ("damaged",)),
    "missing-key-file": (_missing_key, ("key file", "missing")),
    "key-file-0644": (_key_mode(0o644), ("chmod 600",)),
    "key-file-0640": (_key_mode(0o640), ("chmod 600",)),
    "key-file-0604": (_key_mode(0o604), ("chmod 600",)),
    "garbage-key-file": (_garbage_key, ("key file", "256-bit")),
}


@pytest.fixture(params=list(BAD_STORES), ids=list(BAD_STORES))
def bad_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str, tuple[str, ...]]:
    """A data directory spoiled one way; returns it, its secret and expected message parts."""
    damage, fragments = BAD_STORES[request.param]
    data = tmp_path / "data"
    secret = new_store_with_secret(data)
    damage(data)
    return data, secret, fragments


def test_file_store_refuses_to_open_a_bad_store(
    bad_store: tuple[Path, str, tuple[str, ...]],
) -> None:
    data, secret, fragments = bad_store
    before = files(data)
    with pytest.raises(StoreCorrupt) as info:
        FileStore(data)
    message = str(info.value)
    leaked = secret in message
    assert not leaked, "the error message contains the stored secret"
    for fragment in fragments:
        assert fragment in message
    assert files(data) == before  # nothing written, not even a new key
    assert temporaries(data) == []


def test_serve_refuses_to_start_on_a_bad_store(
    bad_store: tuple[Path, str, tuple[str, ...]],
) -> None:
    data, secret, fragments = bad_store
    before = files(data)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--port", "0", "--data-dir", str(data)],
        cwd=ROOT,
        env=broker_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    leaked = secret in output
    assert not leaked, "the broker printed the stored secret"
    assert result.returncode != 0, output
    assert elapsed < QUICK_EXIT_SECONDS
    assert "listening on" not in output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, output
    assert files(data) == before


# -- write failures --------------------------------------------------------------

_real_open = os.open


def _failing(call: Callable[..., Any], code: int, when: Callable[..., bool]) -> Callable[..., Any]:
    def fake(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            raise OSError(code, os.strerror(code))
        return call(*args, **kwargs)

    return fake


def _always(*_args: Any) -> bool:
    return True


def _temporary_path(path: Any, *_args: Any) -> bool:
    return ".tmp-" in str(path)


WRITE_FAILURES: dict[str, tuple[str, int, Callable[..., bool]]] = {
    "ENOSPC-on-write": ("write", errno.ENOSPC, _always),
    "EDQUOT-on-write": ("write", errno.EDQUOT, _always),
    "EACCES-creating-temporary": ("open", errno.EACCES, _temporary_path),
    "EROFS-creating-temporary": ("open", errno.EROFS, _temporary_path),
    "EIO-on-fsync": ("fsync", errno.EIO, _always),
}


@pytest.mark.parametrize("failure", list(WRITE_FAILURES), ids=list(WRITE_FAILURES))
def test_failed_write_is_unavailable_and_changes_nothing(tmp_path: Path, failure: str) -> None:
    name, code, when = WRITE_FAILURES[failure]
    data = tmp_path / "data"
    secret = new_store_with_secret(data)
    before = files(data)
    store = FileStore(data)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, name, _failing(getattr(os, name), code, when))
            with pytest.raises((StoreError, OSError)) as info:
                store.commit([Put("hosts/y", {"access_token": "fake-y"}, 0)])
        leaked = secret in str(info.value) or "fake-y" in str(info.value)
        assert not leaked, "the error message contains a stored value"
        assert isinstance(info.value, StoreUnavailable), f"{type(info.value).__name__}"
        assert files(data) == before
        assert temporaries(data) == []
        assert store.get("hosts/y") is None
        # The store works again once the disk does.
        assert store.commit([Put("hosts/y", {"access_token": "fake-y"}, 0)]).versions == {
            "hosts/y": 1
        }
    finally:
        store.close()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["EACCES", "EROFS"])
def test_uncreatable_lock_file_is_unavailable(tmp_path: Path, code: int) -> None:
    """E.g. a data directory on a read-only mount. FAILS until the lock is wrapped."""
    data = tmp_path / "data"
    new_store_with_secret(data)
    (data / LOCK_FILE).unlink()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            os, "open", _failing(_real_open, code, lambda path, *_: str(path).endswith(LOCK_FILE))
        )
        with pytest.raises((StoreError, OSError)) as info:
            FileStore(data)
    assert isinstance(info.value, StoreUnavailable), f"{type(info.value).__name__}"
