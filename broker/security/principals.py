"""Principals: who may call the broker, with which roles, on which image hosts.

The principals file (JSON, mode 0600) stores only SHA-256 hashes of bearer
tokens. Tokens are 256-bit random values, so a fast hash is enough: nobody can
brute-force the preimage, and the broker never keeps a token it could leak.
The server re-reads the file when it changes; adding a principal needs no restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.core.image_hosts import ID_RE

ROLES = ("admin", "launcher", "provisioner", "viewer")
TOKEN_PREFIX = "cbt_"  # noqa: S105 - a prefix, not a secret
NAME_RE = re.compile(r"[a-z][a-z0-9._@-]{0,62}")
_RELOAD_INTERVAL = 1.0


class PrincipalsError(ValueError):
    """The principals file or a change to it breaks a rule."""


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    #: Image host ids this principal may use; empty means every host.
    image_hosts: frozenset[str] = frozenset()
    token_hashes: tuple[str, ...] = field(default=(), repr=False)
    certificate_identities: frozenset[str] = frozenset()

    def may_use_host(self, image_host_id: str) -> bool:
        return not self.image_hosts or image_host_id in self.image_hosts


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _strings(raw: dict[str, Any], key: str, name: str) -> list[str]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PrincipalsError(f"principal {name}: {key} must be a list of strings")
    return value


def _principal_from_json(raw: Any) -> Principal:
    if not isinstance(raw, dict):
        raise PrincipalsError("each principal must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PrincipalsError(f"principal name {name!r} is invalid")
    roles = frozenset(_strings(raw, "roles", name))
    if not roles or not roles <= set(ROLES):
        raise PrincipalsError(f"principal {name}: roles must be among {', '.join(ROLES)}")
    hashes = tuple(_strings(raw, "token_sha256", name))
    if any(not re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes):
        raise PrincipalsError(f"principal {name}: token_sha256 entries must be SHA-256 hex digests")
    identities = frozenset(_strings(raw, "certificate_identities", name))
    if any(not c.startswith(("cn:", "uri:")) or len(c) < 4 for c in identities):
        raise PrincipalsError(f"principal {name}: certificate identities are cn:NAME or uri:URI")
    hosts = frozenset(_strings(raw, "image_hosts", name))
    if any(not ID_RE.fullmatch(h) for h in hosts):
        raise PrincipalsError(
            f"principal {name}: image_hosts are image host ids (like 'team-a'), not resource names"
        )
    return Principal(
        name=name,
        roles=roles,
        image_hosts=hosts,
        token_hashes=hashes,
        certificate_identities=identities,
    )


def _principal_to_json(principal: Principal) -> dict[str, Any]:
    return {
        "name": principal.name,
        "roles": sorted(principal.roles),
        "image_hosts": sorted(principal.image_hosts),
        "token_sha256": list(principal.token_hashes),
        "certificate_identities": sorted(principal.certificate_identities),
    }


def parse_principals(text: str) -> list[Principal]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrincipalsError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("principals"), list):
        raise PrincipalsError('expected {"principals": [...]}')
    principals = [_principal_from_json(raw) for raw in document["principals"]]
    names = [p.name for p in principals]
    if len(set(names)) != len(names):
        raise PrincipalsError("principal names must be unique")
    return principals


class PrincipalsFile:
    """Reads and changes the principals file; every change is locked and atomic."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> list[Principal]:
        try:
            return parse_principals(self.path.read_text())
        except FileNotFoundError:
            return []
        except UnicodeDecodeError as exc:
            raise PrincipalsError(f"{self.path}: not UTF-8 text ({exc.reason})") from None
        except PrincipalsError as exc:
            raise PrincipalsError(f"{self.path}: {exc}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[Principal]]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.load()
        finally:
            os.close(fd)

    def _save(self, principals: Iterable[Principal]) -> None:
        text = json.dumps({"principals": [_principal_to_json(p) for p in principals]}, indent=2)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def add(
        self,
        name: str,
        roles: Sequence[str],
        *,
        image_hosts: Sequence[str] = (),
        certificate_identities: Sequence[str] = (),
        with_token: bool = True,
    ) -> str | None:
        """Add a principal; returns its new bearer token (shown once) or None."""
        token = new_token() if with_token else None
        candidate = {
            "name": name,
            "roles": list(roles),
            "image_hosts": list(image_hosts),
            "token_sha256": [hash_token(token)] if token else [],
            "certificate_identities": list(certificate_identities),
        }
        principal = _principal_from_json(candidate)
        if not token and not principal.certificate_identities:
            raise PrincipalsError(f"principal {name} needs a token or a certificate identity")
        with self._locked() as principals:
            if any(p.name == name for p in principals):
                raise PrincipalsError(f"principal {name} already exists")
            self._save([*principals, principal])
        return token

    def remove(self, name: str) -> None:
        with self._locked() as principals:
            remaining = [p for p in principals if p.name != name]
            if len(remaining) == len(principals):
                raise PrincipalsError(f"principal {name} does not exist")
            self._save(remaining)

    def rotate_token(self, name: str) -> str:
        """Replace every token of a principal by a new one; returns it (shown once)."""
        token = new_token()
        with self._locked() as principals:
            if not any(p.name == name for p in principals):
                raise PrincipalsError(f"principal {name} does not exist")
            self._save(
                [
                    Principal(
                        p.name,
                        p.roles,
                        p.image_hosts,
                        (hash_token(token),),
                        p.certificate_identities,
                    )
                    if p.name == name
                    else p
                    for p in principals
                ]
            )
        return token


class PrincipalRegistry:
    """The server's view of the principals file, re-read when the file changes."""

    def __init__(self, source: PrincipalsFile) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._principals: list[Principal] = source.load()
        self._signature = self._file_signature()
        self._checked = time.monotonic()

    def _file_signature(self) -> tuple[int, int, int] | None:
        try:
            st = self._source.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def principals(self) -> list[Principal]:
        now = time.monotonic()
        if now - self._checked >= _RELOAD_INTERVAL:
            with self._lock:
                self._checked = now
                signature = self._file_signature()
                if signature != self._signature:
                    # A broken edit keeps the last good principals in force.
                    with contextlib.suppress(PrincipalsError, OSError):
                        self._principals = self._source.load()
                        self._signature = signature
        return self._principals

    def by_token(self, token: str) -> Principal | None:
        presented = hash_token(token)
        found = None
        # Compare against every hash, in constant time, whatever matches first.
        for principal in self.principals():
            for stored in principal.token_hashes:
                if hmac.compare_digest(presented, stored) and found is None:
                    found = principal
        return found

    def by_certificate(self, identities: Iterable[str]) -> Principal | None:
        wanted = set(identities)
        for principal in self.principals():
            if principal.certificate_identities & wanted:
                return principal
        return None
