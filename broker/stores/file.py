"""The embedded store: one AES-GCM encrypted file in the data directory.

Layout of `store.enc`: magic (8 bytes) | key id (8) | nonce (12) | ciphertext.
The key id (first bytes of SHA-256 of the key) tells "wrong key" apart from
"damaged file". Writes go to a temporary file that is fsynced and renamed over
the old one, so a writer killed at any moment leaves either the old or the new
content. A `flock` on `store.lock` serialises writers across processes.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.stores.base import (
    CommitResult,
    Entry,
    Operation,
    StoreCorrupt,
    StoreUnavailable,
    apply_operations,
)

MAGIC = b"CBSTORE1"
KEY_ID_SIZE = 8
NONCE_SIZE = 12
HEADER_SIZE = len(MAGIC) + KEY_ID_SIZE + NONCE_SIZE
DATA_FILE = "store.enc"
KEY_FILE = "store.key"
LOCK_FILE = "store.lock"
_TMP_MARKER = ".tmp-"


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_SIZE]


class FileStore:
    """SecretStore over one encrypted file; safe for threads and processes."""

    def __init__(self, directory: Path, key_file: Path | None = None) -> None:
        self._dir = directory
        self._data_path = directory / DATA_FILE
        self._lock_path = directory / LOCK_FILE
        self._key_path = key_file or directory / KEY_FILE
        self._thread_lock = threading.Lock()
        # (header of the file last decrypted, its state): every write has a
        # fresh random nonce, so an equal header means unchanged content.
        self._cache: tuple[bytes, dict[str, Any]] | None = None
        self._prepare_directory()
        with self._exclusive():
            # Under the lock: no other process is creating the key or writing.
            self._remove_stale_temporaries()
            self._key = self._load_or_create_key()
            # Reading at start turns a wrong key or a damaged file into a clear
            # refusal to start, before anything could be written.
            self._read_state()

    # -- SecretStore -------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        state = self._read_state()
        raw = state["entries"].get(key)
        return None if raw is None else _entry(key, raw)

    def list(self, prefix: str) -> list[Entry]:
        entries = self._read_state()["entries"]
        return [_entry(k, entries[k]) for k in sorted(entries) if k.startswith(prefix)]

    def commit(self, operations: Sequence[Operation]) -> CommitResult:
        with self._exclusive():
            # Decrypt afresh: a write must never build on a cached copy of a file
            # that was damaged after it was read.
            state = self._read_state(use_cache=False)
            versions = apply_operations(state["entries"], state["retired"], operations)
            if versions:
                self._write_state(state)
            return CommitResult(versions=versions)

    def close(self) -> None:
        self._cache = None

    # -- files ---------------------------------------------------------------

    def _prepare_directory(self) -> None:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot create data directory {self._dir}: {exc.strerror}"
            ) from None

    def _load_or_create_key(self) -> bytes:
        try:
            return self._load_key()
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot read or create key file {self._key_path}: {exc.strerror}"
            ) from None

    def _load_key(self) -> bytes:
        if not self._key_path.exists():
            if self._data_path.exists():
                raise StoreCorrupt(
                    f"{self._data_path} exists but its key file {self._key_path} is missing; "
                    "restore the key file (nothing was changed)"
                )
            self._create_key()
        mode = self._key_path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StoreCorrupt(
                f"key file {self._key_path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {self._key_path}"
            )
        raw = self._key_path.read_bytes()
        try:
            key = base64.b64decode(raw.strip(), validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise StoreCorrupt(f"key file {self._key_path} does not hold a 256-bit base64 key")
        return key

    def _create_key(self) -> None:
        # Write the key to a private temporary file, then link it into place:
        # link() fails if another process won the race, and a reader never sees
        # a half-written key.
        tmp = self._key_path.with_name(f"{self._key_path.name}{_TMP_MARKER}{secrets.token_hex(8)}")
        content = base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if os.write(fd, content) != len(content):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self._key_path)
        finally:
            tmp.unlink(missing_ok=True)  # also when writing the key failed
        _fsync_directory(self._key_path.parent)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._thread_lock:
            try:
                # Read-only is enough for flock, and works on a read-only mount.
                fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
            except OSError as exc:
                raise StoreUnavailable(
                    f"cannot open lock file {self._lock_path}: {exc.strerror}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _remove_stale_temporaries(self) -> None:
        # Called with the lock held: no live writer owns a temporary file now.
        stale = [
            *self._dir.glob(f"{DATA_FILE}{_TMP_MARKER}*"),
            *self._key_path.parent.glob(f"{self._key_path.name}{_TMP_MARKER}*"),
        ]
        for path in stale:
            path.unlink(missing_ok=True)

    def _read_state(self, *, use_cache: bool = True) -> dict[str, Any]:
        try:
            blob = self._data_path.read_bytes()
        except FileNotFoundError:
            return {"format": 1, "entries": {}, "retired": {}}
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {self._data_path}: {exc.strerror}") from None
        cache = self._cache
        if use_cache and cache is not None and cache[0] == blob[:HEADER_SIZE]:
            return cache[1]
        state = self._decrypt(blob)
        if not use_cache:
            return state
        self._cache = (blob[:HEADER_SIZE], state)
        return state

    def _decrypt(self, blob: bytes) -> dict[str, Any]:
        damaged = (
            f"{self._data_path} is damaged and cannot be read; "
            "restore it from a backup (nothing was changed)"
        )
        if len(blob) < HEADER_SIZE or not blob.startswith(MAGIC):
            raise StoreCorrupt(damaged)
        key_id = blob[len(MAGIC) : len(MAGIC) + KEY_ID_SIZE]
        if key_id != _key_id(self._key):
            raise StoreCorrupt(
                f"{self._data_path} was encrypted with a different key than {self._key_path}; "
                "use the matching key file (nothing was changed)"
            )
        nonce = blob[len(MAGIC) + KEY_ID_SIZE : HEADER_SIZE]
        try:
            plain = AESGCM(self._key).decrypt(
                nonce, blob[HEADER_SIZE:], blob[: len(MAGIC) + KEY_ID_SIZE]
            )
            state = json.loads(plain)
        except (InvalidTag, ValueError):
            raise StoreCorrupt(damaged) from None
        if not isinstance(state, dict) or state.get("format") != 1:
            raise StoreCorrupt(damaged)
        state.setdefault("retired", {})
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        header = MAGIC + _key_id(self._key)
        nonce = secrets.token_bytes(NONCE_SIZE)
        plain = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        blob = header + nonce + AESGCM(self._key).encrypt(nonce, plain, header)
        tmp = self._data_path.with_name(f"{DATA_FILE}{_TMP_MARKER}{secrets.token_hex(8)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._data_path)
            _fsync_directory(self._dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreUnavailable(f"cannot write {self._data_path}: {exc.strerror}") from None


def _entry(key: str, raw: dict[str, Any]) -> Entry:
    return Entry(key=key, data=copy.deepcopy(raw["data"]), version=int(raw["version"]))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
