"""SecretStore on HashiCorp Vault KV version 2, through hvac.

Key `k` is the secret `{prefix}/{k}` of the KV v2 mount. An entry's version is
its KV version; every write is check-and-set (`cas`), so two replicas can never
both win. Deletes are soft (the latest version is deleted, metadata stays), so
a key's version numbers never repeat and an old etag never matches again.

KV v2 has no multi-key transactions: `commit` applies a batch in order (checks
first) and, when an operation conflicts, undoes the ones already applied with
compare-and-set writes before raising VersionConflict.
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import hvac
import hvac.exceptions
import requests

from broker.stores.base import (
    Check,
    CommitResult,
    Entry,
    Operation,
    Put,
    StoreError,
    StorePermissionDenied,
    StoreUnavailable,
    VersionConflict,
    check_key,
)

_log = logging.getLogger("credbroker.vault")
_T = TypeVar("_T")

CAS_MISMATCH = "check-and-set parameter did not match the current version"
DEFAULT_K8S_JWT = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
# Renew a token once this fraction of its TTL has passed.
_RENEW_AT = 2 / 3
_MIN_RENEW_DELAY = 1.0


class VaultAuth(Protocol):
    """Obtains a token for the client; called at start and whenever Vault rejects it."""

    description: str

    def login(self, client: hvac.Client) -> None: ...

    def can_log_in_again(self) -> bool:
        """Whether a rejected token can be replaced by logging in again."""
        ...


@dataclass
class TokenAuth:
    """A token given directly (VAULT_TOKEN) or in a file that a Vault Agent rewrites."""

    token: str | None = None
    token_file: Path | None = None
    description: str = "token"

    def login(self, client: hvac.Client) -> None:
        if self.token_file is not None:
            try:
                client.token = self.token_file.read_text().strip()
            except OSError as exc:
                raise StoreUnavailable(
                    f"cannot read the Vault token file {self.token_file}: {exc.strerror}"
                ) from None
        elif self.token:
            client.token = self.token
        else:
            raise StoreUnavailable("no Vault token: set VAULT_TOKEN or a token file")

    def can_log_in_again(self) -> bool:
        return self.token_file is not None  # the agent may have written a new one


@dataclass
class AppRoleAuth:
    role_id: str
    secret_id_file: Path
    mount_point: str = "approle"
    description: str = "AppRole"

    def login(self, client: hvac.Client) -> None:
        try:
            secret_id = self.secret_id_file.read_text().strip()
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot read the AppRole secret id file {self.secret_id_file}: {exc.strerror}"
            ) from None
        client.auth.approle.login(
            role_id=self.role_id, secret_id=secret_id, mount_point=self.mount_point
        )

    def can_log_in_again(self) -> bool:
        return True


@dataclass
class KubernetesAuth:
    role: str
    jwt_file: Path = DEFAULT_K8S_JWT
    mount_point: str = "kubernetes"
    description: str = "Kubernetes"

    def login(self, client: hvac.Client) -> None:
        try:
            jwt = self.jwt_file.read_text().strip()
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot read the service account token {self.jwt_file}: {exc.strerror}"
            ) from None
        client.auth.kubernetes.login(role=self.role, jwt=jwt, mount_point=self.mount_point)

    def can_log_in_again(self) -> bool:
        return True


@dataclass(frozen=True)
class VaultSettings:
    url: str
    auth: VaultAuth
    mount: str = "secret"
    prefix: str = "credbroker"
    namespace: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout: float = 5.0


def _is_invalid_token(exc: hvac.exceptions.Forbidden) -> bool:
    return any("invalid token" in str(e) for e in (exc.errors or []))


class VaultStore:
    def __init__(self, settings: VaultSettings) -> None:
        self._settings = settings
        self._root = settings.prefix.strip("/")
        verify: bool | str = str(settings.ca_file) if settings.ca_file else True
        cert = (
            (str(settings.client_cert), str(settings.client_key))
            if settings.client_cert and settings.client_key
            else None
        )
        self._client = hvac.Client(
            url=settings.url,
            verify=verify,
            cert=cert,
            namespace=settings.namespace,
            timeout=settings.timeout,
        )
        self._login_lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._login()

    # -- SecretStore -----------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        path = self._path(key)

        def read() -> Entry | None:
            try:
                response = self._client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=self._settings.mount, raise_on_deleted_version=False
                )
            except hvac.exceptions.InvalidPath:
                return None
            body = response.get("data") or {}
            if body.get("data") is None:
                return None  # soft-deleted
            return Entry(key=key, data=body["data"], version=int(body["metadata"]["version"]))

        return self._call("read", f"data/{path}", read)

    def list(self, prefix: str) -> list[Entry]:
        # KV lists folders: list the folder holding the prefix, then filter.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        keys = self._list_keys(folder)
        entries = [self.get(k) for k in sorted(keys) if k.startswith(prefix)]
        return [e for e in entries if e is not None]

    def commit(self, operations: Sequence[Operation]) -> CommitResult:
        # What each key held before the batch touched it, to restore on a conflict.
        originals: dict[str, Entry | None] = {}
        versions: dict[str, int] = {}
        for op in operations:
            check_key(op.key)
        try:
            for op in operations:
                if isinstance(op, Check):
                    self._check(op.key, op.expected_version)
                    continue
                if op.key not in originals:
                    originals[op.key] = self.get(op.key)
                if isinstance(op, Put):
                    versions[op.key] = self._put(op.key, op.data, op.expected_version)
                else:
                    self._delete(op.key, op.expected_version)
                    versions[op.key] = 0
        except StoreError:
            self._restore(originals, versions)
            raise
        return CommitResult(versions=versions)

    def _restore(self, originals: dict[str, Entry | None], written: dict[str, int]) -> None:
        """Undo the part of a batch that was applied (new versions, old contents)."""
        for key in reversed([k for k in originals if k in written]):
            original = originals[key]
            try:
                _, live = self._live_version(key)
                if live != written[key]:
                    # Another writer changed the key after this batch did: its write stands.
                    _log.warning("not undoing %r: it changed again after this batch", key)
                    continue
                if original is None:
                    self._delete(key, live)
                else:
                    self._put(key, original.data, live)
            except StoreError as exc:
                _log.error("could not undo part of an interrupted batch on %r: %s", key, exc)

    def close(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(5)
        self._client.adapter.close()

    # -- KV operations -----------------------------------------------------------

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if self._root else key

    def _metadata(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)

        def read() -> dict[str, Any] | None:
            try:
                response = self._client.secrets.kv.v2.read_secret_metadata(
                    path=path, mount_point=self._settings.mount
                )
            except hvac.exceptions.InvalidPath:
                return None
            data: dict[str, Any] = response["data"]
            return data

        return self._call("read metadata of", f"metadata/{path}", read)

    def _live_version(self, key: str) -> tuple[int, int]:
        """(current version, live version): live is 0 when absent, deleted or destroyed."""
        metadata = self._metadata(key)
        if metadata is None:
            return 0, 0
        current = int(metadata.get("current_version") or 0)
        state = (metadata.get("versions") or {}).get(str(current)) or {}
        if state.get("deletion_time") or state.get("destroyed"):
            return current, 0
        return current, current

    def _check(self, key: str, expected: int) -> None:
        _, live = self._live_version(key)
        if live != expected:
            raise VersionConflict(key, expected, live)

    def _put(self, key: str, data: Any, expected: int) -> int:
        current, live = self._live_version(key)
        if live != expected:
            raise VersionConflict(key, expected, live)
        path = self._path(key)
        # A key deleted before keeps its metadata: its next version follows `current`.
        cas = current if expected == 0 else expected

        def write() -> int:
            try:
                response = self._client.secrets.kv.v2.create_or_update_secret(
                    path=path, secret=dict(data), cas=cas, mount_point=self._settings.mount
                )
            except hvac.exceptions.InvalidRequest as exc:
                if any(CAS_MISMATCH in str(e) for e in (exc.errors or [])):
                    raise VersionConflict(key, expected, -1) from None
                raise
            return int(response["data"]["version"])

        # Vault wants "create" on a key without metadata, "update" on one with it.
        return self._call("create" if current == 0 else "update", f"data/{path}", write)

    def _delete(self, key: str, expected: int) -> None:
        _, live = self._live_version(key)
        if live != expected:
            raise VersionConflict(key, expected, live)
        if expected == 0:
            return
        path = self._path(key)
        self._call(
            "delete",
            f"delete/{path}",
            lambda: self._client.secrets.kv.v2.delete_secret_versions(
                path=path, versions=[expected], mount_point=self._settings.mount
            ),
        )
        # KV deletes take no cas: a version written meanwhile survives, and then
        # this delete lost the race.
        current, _ = self._live_version(key)
        if current != expected:
            raise VersionConflict(key, expected, current)

    def _list_keys(self, prefix: str) -> builtins.list[str]:
        """Every key below `prefix` (a folder like "hosts", or "" for all)."""
        found: builtins.list[str] = []
        folders = [prefix]
        while folders:
            folder = folders.pop()
            path = self._path(folder) if folder else self._root

            def read(path: str = path) -> builtins.list[str]:
                try:
                    response = self._client.secrets.kv.v2.list_secrets(
                        path=path, mount_point=self._settings.mount
                    )
                except hvac.exceptions.InvalidPath:
                    return []
                return [str(k) for k in response["data"]["keys"]]

            for name in self._call("list", f"metadata/{path}", read):
                child = f"{folder}/{name}" if folder else name
                if name.endswith("/"):
                    folders.append(child.rstrip("/"))
                else:
                    found.append(child)
        return found

    # -- authentication and errors -------------------------------------------------

    def _login(self) -> None:
        with self._login_lock:
            self._call_raw(
                "log in to",
                "auth",
                lambda: self._settings.auth.login(self._client),
                where=f"the {self._settings.auth.description} auth method",
            )
            self._schedule_renewal()

    def _schedule_renewal(self) -> None:
        try:
            info = self._client.auth.token.lookup_self()["data"]
        except (hvac.exceptions.VaultError, requests.RequestException):
            return  # renewal is best effort; a rejected token triggers a new login
        ttl = float(info.get("ttl") or 0)
        if ttl <= 0 or (self._renewer is not None and self._renewer.is_alive()):
            return
        self._renewer = threading.Thread(
            target=self._renew_loop,
            args=(bool(info.get("renewable")),),
            daemon=True,
            name="vault-token-renewal",
        )
        self._renewer.start()

    def _renew_loop(self, renewable: bool) -> None:
        while not self._stop.is_set():
            try:
                ttl = float(self._client.auth.token.lookup_self()["data"].get("ttl") or 0)
            except (hvac.exceptions.VaultError, requests.RequestException):
                ttl = 0
            if ttl <= 0:
                return  # a periodic/root token, or a dead one: the next call logs in again
            if self._stop.wait(max(_MIN_RENEW_DELAY, ttl * _RENEW_AT)):
                return
            try:
                if renewable:
                    self._client.auth.token.renew_self()
                elif self._settings.auth.can_log_in_again():
                    with self._login_lock:
                        self._settings.auth.login(self._client)
            except (hvac.exceptions.VaultError, requests.RequestException, StoreError) as exc:
                _log.warning("could not renew the Vault token: %s", type(exc).__name__)
                if self._settings.auth.can_log_in_again():
                    try:
                        with self._login_lock:
                            self._settings.auth.login(self._client)
                    except (hvac.exceptions.VaultError, requests.RequestException, StoreError):
                        pass

    def _call(self, action: str, path: str, fn: Callable[[], _T]) -> _T:
        try:
            return self._call_raw(action, path, fn)
        except _TokenRejected:
            if not self._settings.auth.can_log_in_again():
                raise StoreUnavailable(
                    f"Vault rejected the broker's token ({self._settings.auth.description} "
                    "login; expired or revoked)"
                ) from None
            _log.info(
                "Vault rejected the token; logging in again (%s)", self._settings.auth.description
            )
            self._login()
            try:
                return self._call_raw(action, path, fn)
            except _TokenRejected:
                raise StoreUnavailable(
                    f"Vault rejected the broker's token ({self._settings.auth.description} "
                    "login) even after logging in again"
                ) from None

    def _call_raw(
        self, action: str, path: str, fn: Callable[[], _T], *, where: str | None = None
    ) -> _T:
        where = where or f"{self._settings.mount}/{path}"
        try:
            return fn()
        except hvac.exceptions.Forbidden as exc:
            if _is_invalid_token(exc):
                raise _TokenRejected from None
            raise StorePermissionDenied(
                f"Vault denied the broker permission to {action} {where}: "
                f"its policy lacks the capability ({_CAPABILITY.get(action, action)})"
            ) from None
        except hvac.exceptions.VaultDown:
            raise StoreUnavailable(f"Vault at {self._settings.url} is sealed or down") from None
        except hvac.exceptions.InvalidRequest as exc:
            raise StoreError(
                f"Vault refused to {action} {where}: {'; '.join(exc.errors or [])}"
            ) from None
        except hvac.exceptions.VaultError as exc:
            raise StoreUnavailable(
                f"Vault could not {action} {where}: {type(exc).__name__}"
            ) from None
        except requests.RequestException as exc:
            raise StoreUnavailable(
                f"cannot reach Vault at {self._settings.url}: {type(exc).__name__}"
            ) from None


class _TokenRejected(Exception):
    """Vault said the token is invalid (expired or revoked)."""


_CAPABILITY = {
    "read": "read on data/",
    "read metadata of": "read on metadata/",
    "create": "create on data/",
    "update": "update on data/",
    "delete": "update on delete/",
    "list": "list on metadata/",
    "log in to": "login",
}
