"""An HTTP-level HashiCorp Vault emulator for tests (no Vault binary can be installed here).

It reproduces ``/work/shared/reference/vault.md``: the response envelope, KV v2
(read/write/patch/delete/undelete/destroy/list/metadata, check-and-set, soft
delete, max_versions pruning, delete_version_after), tokens (lookup-self,
renew-self, revoke-self, create, expiry, revocation), AppRole and Kubernetes
login, ACL policies (HCL subset, ``*`` and ``+``, deny, most-specific match),
``sys/health`` and ``sys/seal-status``, a sealed mode, Enterprise-style
namespaces (``X-Vault-Namespace``) and fault injection (latency, 5xx answers,
dropped connections). Its own tests (tests/integration/test_vault_emulator.py)
pin every status code and body through hvac, so drift from real Vault fails.

Usage::

    emu = VaultEmulator().start()                       # KV v2 mount "secret" is enabled
    emu.put_policy("credbroker", Path("deploy/vault/credbroker.hcl").read_text())
    token = emu.create_token(policies=["credbroker"], ttl=60)
    client = hvac.Client(url=emu.url, token=token)
    ...
    client.adapter.close()
    emu.stop()

Only the standard library is used. The server listens on 127.0.0.1 with an
ephemeral port, one thread per connection; ``stop()`` closes every connection
and joins every thread (bounded). Token values are never logged: the request
log (``requests``) records whether a token was sent, not which.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import hmac
import json
import re
import secrets
import socket
import string
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.emulator_server import (
    EmulatorRequestHandler,
    EmulatorServer,
    ServedEmulator,
)
from tests.support.vault_policy import (
    ACL,
    DEFAULT_POLICY_HCL,
    Policy,
    PolicyError,
    build_acl,
    parse_policy,
)

__all__ = [
    "HAState",
    "InjectedFault",
    "RequestRecord",
    "VaultEmulator",
    "go_duration",
    "rfc3339_nano",
]

VAULT_VERSION = "1.15.6"
NS_PER_S = 1_000_000_000
SYSTEM_MAX_TTL_S = 768 * 3600  # Vault's default max_lease_ttl (32 days)
DEFAULT_MAX_VERSIONS = 10
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # Vault's default max_request_size

ERR_PERMISSION_DENIED = "1 error occurred:\n\t* permission denied\n\n"
ERR_NO_TOKEN = "permission denied"
ERR_INVALID_TOKEN = "2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"
ERR_SEALED = "Vault is sealed"
ERR_UNSUPPORTED_PATH = "1 error occurred:\n\t* unsupported path\n\n"
ERR_UNSUPPORTED_OPERATION = "1 error occurred:\n\t* unsupported operation\n\n"
ERR_CAS_MISMATCH = "check-and-set parameter did not match the current version"
ERR_CAS_REQUIRED = "check-and-set parameter required for this call"
ERR_APPROLE_LOGIN = "invalid role or secret ID"
MERGE_PATCH = "application/merge-patch+json"

HAState = Literal["active", "standby", "performance_standby", "dr_secondary"]
Operation = Literal["read", "list", "update", "delete", "patch"]

_TOKEN_ALPHABET = string.ascii_letters + string.digits


# --------------------------------------------------------------------------- formats


def rfc3339_nano(ns: int) -> str:
    """Go's time.RFC3339Nano in UTC: nanoseconds with trailing zeros trimmed."""
    seconds, frac = divmod(ns, NS_PER_S)
    text = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def _fraction(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}." + str(frac).rjust(digits, "0").rstrip("0")


def go_duration(ns: int) -> str:
    """Go's time.Duration.String(): 0s, 1.5s, 1m30s, 1h0m0s, 250ms."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000:
        return f"{sign}{u}ns"
    if u < 1_000_000:
        return f"{sign}{_fraction(u, 1_000)}µs"
    if u < NS_PER_S:
        return f"{sign}{_fraction(u, 1_000_000)}ms"
    hours, rest = divmod(u, 3600 * NS_PER_S)
    minutes, rest = divmod(rest, 60 * NS_PER_S)
    seconds = _fraction(rest, NS_PER_S) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_duration_seconds(value: Any) -> int:
    """Vault's parseutil.ParseDurationSecond: an int of seconds, "90", "1h30m", "7d"."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}")
    text = value.strip()
    if not text:
        return 0
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    negative = text.startswith("-")
    text = text.lstrip("+-")
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid duration {value!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return -int(total) if negative else int(total)


def _go_json(value: Any, *, sort: bool = True) -> str:
    """JSON the way Go's encoding/json writes it (compact, UTF-8, HTML-escaped)."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=sort, ensure_ascii=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text


def _ordered_json(fields: Sequence[tuple[str, Any]]) -> str:
    """A Go struct: fields in declaration order, maps inside sorted."""
    return "{" + ",".join(f"{json.dumps(k)}:{_go_json(v)}" for k, v in fields) + "}"


def _random_token(prefix: str = "hvs.", length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(length))


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator received. Never holds a token value or a body."""

    method: str
    path: str  # URL path without the query, e.g. "/v1/secret/data/reg"
    query: str  # raw query string ("" when none), e.g. "version=2" or "list=true"
    token_present: bool  # X-Vault-Token or Authorization: Bearer was sent
    namespace: str  # X-Vault-Namespace, normalised ("" for the root namespace)
    status: int | None  # None when the connection was dropped


@dataclass
class InjectedFault:
    """A fault armed with VaultEmulator.inject(); ``hits`` counts the requests it hit."""

    path_regex: re.Pattern[str] | None
    method: str | None
    status: int | None
    delay: float
    drop: bool
    errors: list[str]
    remaining: int | None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.path_regex is None or self.path_regex.search(path) is not None


# --------------------------------------------------------------------------- state


@dataclass
class _Version:
    data: dict[str, Any] | None
    created_ns: int
    deletion_ns: int | None = None
    destroyed: bool = False


@dataclass
class _KeyMeta:
    versions: dict[int, _Version] = field(default_factory=dict)
    current_version: int = 0
    oldest_version: int = 0
    max_versions: int = 0
    cas_required: bool = False
    delete_version_after_s: int = 0
    custom_metadata: dict[str, str] | None = None
    created_ns: int | None = None
    updated_ns: int | None = None


@dataclass
class _KVMount:
    keys: dict[str, _KeyMeta] = field(default_factory=dict)
    max_versions: int = 0
    cas_required: bool = False
    delete_version_after_s: int = 0


@dataclass
class _Token:
    value: str
    accessor: str
    namespace: str
    policies: list[str]
    issue_ns: int
    creation_ttl_s: int
    expire_ns: int | None
    max_expire_ns: int | None
    explicit_max_ttl_s: int
    renewable: bool
    display_name: str
    path: str
    meta: dict[str, str] | None
    entity_id: str
    orphan: bool
    num_uses: int = 0
    last_renewal_ns: int | None = None

    @property
    def is_root(self) -> bool:
        return "root" in self.policies


@dataclass
class _SecretID:
    num_uses: int  # 0: unlimited
    expire_ns: int | None


@dataclass
class _AppRole:
    name: str
    role_id: str
    policies: list[str]
    token_ttl_s: int
    token_max_ttl_s: int
    token_num_uses: int
    bind_secret_id: bool
    secret_id_num_uses: int
    secret_id_ttl_s: int
    entity_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    secret_ids: dict[str, _SecretID] = field(default_factory=dict)


@dataclass
class _KubernetesRole:
    name: str
    service_accounts: list[str]
    namespaces: list[str]
    policies: list[str]
    token_ttl_s: int
    token_max_ttl_s: int
    audience: str | None
    entity_ids: dict[str, str] = field(default_factory=dict)


@dataclass
class _Namespace:
    path: str
    mounts: dict[str, _KVMount] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)
    approle_mounts: dict[str, dict[str, _AppRole]] = field(default_factory=dict)
    kubernetes_mounts: dict[str, dict[str, _KubernetesRole]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.policies.setdefault("default", parse_policy("default", DEFAULT_POLICY_HCL))


@dataclass
class _Reply:
    status: int
    body: bytes | None = None
    content_type: str | None = "application/json"


@dataclass
class _Request:
    method: str
    op: Operation
    path: str  # below /v1/, with a trailing "/" for list operations
    query: dict[str, list[str]]
    headers: Message
    body: dict[str, Any] | None
    namespace: _Namespace
    token: str | None


_Handler = Callable[[], _Reply]


class _Route:
    """A resolved request: the capability the ACL must grant, and the handler."""

    def __init__(self, capability: str, handler: _Handler) -> None:
        self.capability = capability
        self.handler = handler


def _error(status: int, *messages: str) -> _Reply:
    return _Reply(status, (_go_json({"errors": list(messages)}) + "\n").encode())


def _no_content() -> _Reply:
    return _Reply(204, None, None)


def _not_found() -> _Reply:
    return _error(404)


# --------------------------------------------------------------------------- HTTP plumbing


class _RequestHandler(EmulatorRequestHandler):
    max_request_bytes = MAX_REQUEST_BYTES
    server: _Server

    def _serve(self) -> None:
        try:
            body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        if body is None:
            reply: _Reply | None = _error(413, "http: request body too large")
            self.close_connection = True
        else:
            reply = self.server.emulator._handle(self.command, self.path, self.headers, body)
        if reply is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(reply.status)
        self.send_header("Cache-Control", "no-store")
        payload = reply.body if self.command != "HEAD" else None
        if reply.body is not None and reply.content_type is not None:
            self.send_header("Content-Type", reply.content_type)
        if reply.status != 204:
            self.send_header("Content-Length", str(len(payload or b"")))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve
    do_LIST = do_OPTIONS = _serve


class _Server(EmulatorServer):
    def __init__(self, emulator: VaultEmulator) -> None:
        self.emulator = emulator
        super().__init__(_RequestHandler, emulator._server_errors, "vault-emulator-conn")


# --------------------------------------------------------------------------- the emulator


class VaultEmulator(ServedEmulator):
    """A Vault server in this process. Thread-safe; see the module docstring."""

    _thread_name = "vault-emulator"

    def __init__(self, *, root_token: str | None = None, kv_mount: str | None = "secret") -> None:
        self.root_token = root_token or _random_token()
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._offset_ns = 0
        self._namespaces: dict[str, _Namespace] = {"": _Namespace("")}
        self._tokens: dict[str, _Token] = {}
        self._faults: list[InjectedFault] = []
        self._log: list[RequestRecord] = []
        self._server_errors: list[str] = []
        self._sealed = False
        self._initialized = True
        self._ha_state: HAState = "active"
        self._jwt_key = secrets.token_bytes(32)
        self._cluster_id = str(uuid.uuid4())
        self._cluster_name = "vault-cluster-" + secrets.token_hex(4)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        now = self.now_ns()
        self._tokens[self.root_token] = _Token(
            value=self.root_token,
            accessor=_random_token("", 24),
            namespace="",
            policies=["root"],
            issue_ns=now,
            creation_ttl_s=0,
            expire_ns=None,
            max_expire_ns=None,
            explicit_max_ttl_s=0,
            renewable=False,
            display_name="root",
            path="auth/token/root",
            meta=None,
            entity_id="",
            orphan=True,
        )
        if kv_mount is not None:
            self.enable_kv2(kv_mount)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (after start())."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("VaultEmulator not started")
        return int(self._server.server_address[1])

    def _make_server(self) -> EmulatorServer:
        return _Server(self)

    # ------------------------------------------------------------------ clock

    def now_ns(self) -> int:
        """The emulator's clock (wall clock plus advance())."""
        return time.time_ns() + self._offset_ns

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock forward: token TTLs, JWT expiry, delete_version_after."""
        with self._lock:
            self._offset_ns += int(seconds * NS_PER_S)

    # ------------------------------------------------------------------ namespaces & mounts

    @staticmethod
    def _ns_name(namespace: str | None) -> str:
        return (namespace or "").strip("/")

    def add_namespace(self, namespace: str) -> None:
        """Create an (Enterprise) namespace; it starts with no mounts and only ``default``."""
        name = self._ns_name(namespace)
        with self._lock:
            self._namespaces.setdefault(name, _Namespace(name))

    def _ns(self, namespace: str) -> _Namespace:
        name = self._ns_name(namespace)
        try:
            return self._namespaces[name]
        except KeyError:
            raise KeyError(f"no namespace {name!r}: call add_namespace() first") from None

    def enable_kv2(
        self,
        mount: str,
        *,
        max_versions: int = 0,
        cas_required: bool = False,
        delete_version_after: float = 0.0,
        namespace: str = "",
    ) -> None:
        """Mount KV v2 at ``mount`` (or reconfigure it, keeping its data)."""
        path = mount.strip("/")
        if not path:
            raise ValueError("mount path must not be empty")
        with self._lock:
            ns = self._ns(namespace)
            kv = ns.mounts.setdefault(path, _KVMount())
            kv.max_versions = max_versions
            kv.cas_required = cas_required
            kv.delete_version_after_s = int(delete_version_after)

    def disable_mount(self, mount: str, *, namespace: str = "") -> None:
        with self._lock:
            self._ns(namespace).mounts.pop(mount.strip("/"), None)

    # ------------------------------------------------------------------ policies

    def put_policy(self, name: str, hcl: str, *, namespace: str = "") -> None:
        """Install an ACL policy (HCL subset; raises tests.support.vault_policy.PolicyError)."""
        policy = parse_policy(name.lower(), hcl)
        with self._lock:
            self._ns(namespace).policies[name.lower()] = policy

    def delete_policy(self, name: str, *, namespace: str = "") -> None:
        with self._lock:
            self._ns(namespace).policies.pop(name.lower(), None)

    # ------------------------------------------------------------------ tokens

    def _issue(
        self,
        *,
        namespace: str,
        policies: Iterable[str],
        ttl_s: float,
        max_ttl_s: float,
        renewable: bool,
        display_name: str,
        path: str,
        meta: Mapping[str, str] | None,
        entity_id: str = "",
        orphan: bool = True,
        no_default_policy: bool = False,
        num_uses: int = 0,
    ) -> _Token:
        names = {p.strip().lower() for p in policies if p.strip()}
        if "root" in names:
            names = {"root"}
        elif not no_default_policy:
            names.add("default")
        now = self.now_ns()
        limit_s = max_ttl_s if max_ttl_s > 0 else SYSTEM_MAX_TTL_S
        max_expire = now + int(limit_s * NS_PER_S)
        if "root" in names and ttl_s <= 0:
            expire: int | None = None
            max_expire_ns: int | None = None
        else:
            effective = ttl_s if ttl_s > 0 else SYSTEM_MAX_TTL_S
            expire = min(now + int(effective * NS_PER_S), max_expire)
            max_expire_ns = max_expire
        token = _Token(
            value=_random_token(),
            accessor=_random_token("", 24),
            namespace=namespace,
            policies=sorted(names),
            issue_ns=now,
            creation_ttl_s=0 if expire is None else (expire - now) // NS_PER_S,
            expire_ns=expire,
            max_expire_ns=max_expire_ns,
            explicit_max_ttl_s=int(max_ttl_s) if max_ttl_s > 0 else 0,
            renewable=renewable and expire is not None,
            display_name=display_name,
            path=path,
            meta=dict(meta) if meta is not None else None,
            entity_id=entity_id,
            orphan=orphan,
            num_uses=num_uses,
        )
        self._tokens[token.value] = token
        return token

    def create_token(
        self,
        policies: Sequence[str] = (),
        *,
        ttl: float = 3600.0,
        renewable: bool = True,
        max_ttl: float = 0.0,
        namespace: str = "",
        no_default_policy: bool = False,
        display_name: str = "token",
        meta: Mapping[str, str] | None = None,
    ) -> str:
        """A service token (``hvs.…``). ttl/max_ttl in seconds; 0 means Vault's 768h default.

        ``policies=["root"]`` gives a root token (no expiry unless ttl > 0).
        """
        with self._lock:
            self._ns(namespace)
            token = self._issue(
                namespace=self._ns_name(namespace),
                policies=policies,
                ttl_s=ttl,
                max_ttl_s=max_ttl,
                renewable=renewable,
                display_name=f"token-{display_name}" if display_name != "token" else "token",
                path="auth/token/create",
                meta=meta,
                no_default_policy=no_default_policy,
            )
            return token.value

    def revoke(self, token: str) -> None:
        """Revoke a token: every later use answers 403 permission denied + invalid token."""
        with self._lock:
            self._tokens.pop(token, None)

    def expire(self, token: str) -> None:
        """Make a token's TTL run out now (as if its expiry time had passed)."""
        with self._lock:
            found = self._tokens.get(token)
            if found is not None:
                found.expire_ns = self.now_ns() - 1

    def token_info(self, token: str) -> dict[str, Any] | None:
        """What lookup-self would answer for ``token`` (None when invalid)."""
        with self._lock:
            found = self._valid_token(token)
            return None if found is None else self._lookup_data(found)

    def _valid_token(self, value: str) -> _Token | None:
        token = self._tokens.get(value)
        if token is None:
            return None
        if token.expire_ns is not None and token.expire_ns <= self.now_ns():
            del self._tokens[value]
            return None
        return token

    # ------------------------------------------------------------------ auth methods

    def add_approle(
        self,
        role_name: str,
        *,
        policies: Sequence[str] = (),
        token_ttl: float = 3600.0,
        token_max_ttl: float = 0.0,
        token_num_uses: int = 0,
        bind_secret_id: bool = True,
        secret_id_num_uses: int = 0,
        secret_id_ttl: float = 0.0,
        mount: str = "approle",
        namespace: str = "",
    ) -> tuple[str, str]:
        """Create (or replace) an AppRole role; returns (role_id, secret_id)."""
        with self._lock:
            ns = self._ns(namespace)
            roles = ns.approle_mounts.setdefault(mount.strip("/"), {})
            role = _AppRole(
                name=role_name,
                role_id=str(uuid.uuid4()),
                policies=list(policies),
                token_ttl_s=int(token_ttl),
                token_max_ttl_s=int(token_max_ttl),
                token_num_uses=token_num_uses,
                bind_secret_id=bind_secret_id,
                secret_id_num_uses=secret_id_num_uses,
                secret_id_ttl_s=int(secret_id_ttl),
            )
            roles[role_name] = role
            return role.role_id, self._new_secret_id(role)

    def _new_secret_id(self, role: _AppRole) -> str:
        value = str(uuid.uuid4())
        expire = (
            self.now_ns() + role.secret_id_ttl_s * NS_PER_S if role.secret_id_ttl_s > 0 else None
        )
        role.secret_ids[value] = _SecretID(num_uses=role.secret_id_num_uses, expire_ns=expire)
        return value

    def new_secret_id(self, role_name: str, *, mount: str = "approle", namespace: str = "") -> str:
        """Another secret ID for an existing AppRole role."""
        with self._lock:
            role = self._ns(namespace).approle_mounts[mount.strip("/")][role_name]
            return self._new_secret_id(role)

    def revoke_secret_id(
        self, role_name: str, secret_id: str, *, mount: str = "approle", namespace: str = ""
    ) -> None:
        with self._lock:
            role = self._ns(namespace).approle_mounts[mount.strip("/")][role_name]
            role.secret_ids.pop(secret_id, None)

    def add_kubernetes_role(
        self,
        role_name: str,
        *,
        service_account: str | Sequence[str],
        namespace: str | Sequence[str],
        policies: Sequence[str] = (),
        token_ttl: float = 3600.0,
        token_max_ttl: float = 0.0,
        audience: str | None = None,
        mount: str = "kubernetes",
        vault_namespace: str = "",
    ) -> None:
        """A Kubernetes auth role bound to service account name(s) and namespace(s) ("*" ok).

        ``namespace`` is the Kubernetes namespace; ``vault_namespace`` the Vault one.
        """
        accounts = [service_account] if isinstance(service_account, str) else list(service_account)
        k8s_namespaces = [namespace] if isinstance(namespace, str) else list(namespace)
        with self._lock:
            ns = self._ns(vault_namespace)
            roles = ns.kubernetes_mounts.setdefault(mount.strip("/"), {})
            roles[role_name] = _KubernetesRole(
                name=role_name,
                service_accounts=accounts,
                namespaces=k8s_namespaces,
                policies=list(policies),
                token_ttl_s=int(token_ttl),
                token_max_ttl_s=int(token_max_ttl),
                audience=audience,
            )

    def kubernetes_jwt(
        self,
        service_account: str,
        namespace: str,
        *,
        ttl: float = 3600.0,
        audience: str = "https://kubernetes.default.svc.cluster.local",
        uid: str | None = None,
    ) -> str:
        """A projected service account token (JWT) that this emulator's Kubernetes auth accepts.

        Signed with a key only this emulator holds: a tampered token is refused.
        """
        now_s = self.now_ns() // NS_PER_S
        header = {"alg": "RS256", "kid": "vault-emulator", "typ": "JWT"}
        claims = {
            "aud": [audience],
            "exp": now_s + int(ttl),
            "iat": now_s,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {
                    "name": service_account,
                    "uid": uid
                    or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{service_account}")),
                },
            },
            "nbf": now_s,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = hmac.new(self._jwt_key, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + _b64url(signature)

    # ------------------------------------------------------------------ seal & HA

    @property
    def sealed(self) -> bool:
        return self._sealed

    def seal(self) -> None:
        """Every request but sys/health and sys/seal-status answers 503 Vault is sealed."""
        with self._lock:
            self._sealed = True

    def unseal(self) -> None:
        with self._lock:
            self._sealed = False

    def set_initialized(self, initialized: bool) -> None:
        """An uninitialised Vault: sys/health 501, everything else 503 (it is sealed too)."""
        with self._lock:
            self._initialized = initialized

    def set_ha_state(self, state: HAState) -> None:
        """What sys/health reports (429 standby, 473 perf standby, 472 DR secondary).

        A standby forwards to the active node, so every other answer is unchanged.
        """
        if state not in ("active", "standby", "performance_standby", "dr_secondary"):
            raise ValueError(f"unknown HA state {state!r}")
        with self._lock:
            self._ha_state = state

    # ------------------------------------------------------------------ faults

    def inject(
        self,
        *,
        path_regex: str | None = None,
        method: str | None = None,
        status: int | None = None,
        delay: float = 0.0,
        drop: bool = False,
        count: int | None = None,
        errors: Sequence[str] | None = None,
    ) -> InjectedFault:
        """Arm a fault for requests whose URL path (``/v1/…``) matches ``path_regex`` (re.search).

        - ``delay``: sleep that many seconds first (then answer normally, unless
          ``status`` or ``drop`` is given too);
        - ``status``: answer that status with ``{"errors": errors}`` instead;
        - ``drop``: close the connection without any response.
        ``count`` limits how many requests it hits (None: until clear_faults()).
        The first armed fault that matches applies.
        """
        if status is None and not drop and delay <= 0:
            raise ValueError("a fault needs status, delay or drop")
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"bad status {status}")
        fault = InjectedFault(
            path_regex=re.compile(path_regex) if path_regex is not None else None,
            method=method.upper() if method else None,
            status=status,
            delay=delay,
            drop=drop,
            errors=list(errors) if errors is not None else [f"injected fault: HTTP {status}"],
            remaining=count,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> InjectedFault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    # ------------------------------------------------------------------ request log

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------------ direct KV access

    def _mount(self, mount: str, namespace: str) -> _KVMount:
        return self._ns(namespace).mounts[mount.strip("/")]

    def kv_put(
        self, path: str, data: Mapping[str, Any], *, mount: str = "secret", namespace: str = ""
    ) -> int:
        """Write a new version directly (no HTTP, no ACL); returns the version number."""
        with self._lock:
            kv = self._mount(mount, namespace)
            meta = kv.keys.get(path) or _KeyMeta()
            kv.keys[path] = meta
            return self._add_version(kv, meta, dict(data))

    def kv_get(
        self,
        path: str,
        *,
        mount: str = "secret",
        version: int | None = None,
        namespace: str = "",
    ) -> dict[str, Any] | None:
        """The data of a version, or None when missing, soft-deleted or destroyed."""
        with self._lock:
            meta = self._mount(mount, namespace).keys.get(path)
            if meta is None:
                return None
            found = meta.versions.get(version or meta.current_version)
            if found is None or found.destroyed or self._is_deleted(found):
                return None
            return copy.deepcopy(found.data)

    def kv_metadata(
        self, path: str, *, mount: str = "secret", namespace: str = ""
    ) -> dict[str, Any] | None:
        """What a metadata read answers in ``data`` (None when the key has no metadata)."""
        with self._lock:
            meta = self._mount(mount, namespace).keys.get(path)
            return None if meta is None else self._metadata_data(meta)

    def kv_keys(self, *, mount: str = "secret", namespace: str = "") -> list[str]:
        """Every key (full path) that has metadata in the mount, sorted."""
        with self._lock:
            return sorted(self._mount(mount, namespace).keys)

    # ================================================================== HTTP handling

    def _handle(self, method: str, target: str, headers: Message, body: bytes) -> _Reply | None:
        """One HTTP request -> a reply, or None to drop the connection."""
        split = urlsplit(target)
        url_path = split.path
        token = self._request_token(headers)
        namespace = self._ns_name(headers.get("X-Vault-Namespace"))
        shown_path, shown_query = url_path, split.query
        if token:  # a token never reaches the log, even if a client put one in the URL
            shown_path = shown_path.replace(token, "<redacted>")
            shown_query = shown_query.replace(token, "<redacted>")
        status: int | None = None
        try:
            fault = self._take_fault(method, url_path)
            reply: _Reply | None
            if fault is not None and fault.delay > 0 and self._stopping.wait(fault.delay):
                reply = None  # shutting down: give up on the request
            elif fault is not None and fault.drop:
                reply = None
            elif fault is not None and fault.status is not None:
                reply = _error(fault.status, *fault.errors)
            else:
                try:
                    reply = self._dispatch(method, split.path, split.query, headers, body, token)
                except Exception:  # noqa: BLE001 - any emulator bug becomes a visible 500
                    self._server_errors.append(traceback.format_exc())
                    reply = _error(500, "internal error")
            status = None if reply is None else reply.status
            return reply
        finally:
            record = RequestRecord(
                method=method,
                path=shown_path,
                query=shown_query,
                token_present=bool(token),
                namespace=namespace,
                status=status,
            )
            with self._lock:
                self._log.append(record)

    @staticmethod
    def _request_token(headers: Message) -> str | None:
        token = headers.get("X-Vault-Token")
        if token:
            return token.strip()
        auth = headers.get("Authorization") or ""
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None

    def _dispatch(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Message,
        body: bytes,
        token: str | None,
    ) -> _Reply:
        path = unquote(raw_path)
        if not path.startswith("/v1/") or path == "/v1/":
            return _not_found()
        rel = path[len("/v1/") :]
        query = parse_qs(raw_query, keep_blank_values=True)
        with self._lock:
            if rel == "sys/health":
                return self._sys_health(method, query)
            if rel == "sys/seal-status" and method == "GET":
                return self._sys_seal_status()
            if self._sealed or not self._initialized:
                return _error(503, ERR_SEALED)

        op: Operation
        if method == "GET":
            op = "read"
            listing = (query.get("list") or [""])[0]
            if listing:
                flag = _parse_bool(listing)
                if flag is None:
                    return _error(400)
                if flag:
                    op = "list"
        elif method == "LIST":
            op = "list"
        elif method in ("POST", "PUT"):
            op = "update"
        elif method == "DELETE":
            op = "delete"
        elif method == "PATCH":
            op = "patch"
            content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if not content_type:
                return _error(400, "mime: no media type")
            if content_type != MERGE_PATCH:
                return _error(
                    415,
                    f"PATCH requires Content-Type of {MERGE_PATCH}, provided {content_type}",
                )
        else:
            return _error(405)
        if op == "list" and not rel.endswith("/"):
            rel += "/"

        data: dict[str, Any] | None = None
        if op in ("update", "patch") and body.strip():
            try:
                parsed = json.loads(body)
            except ValueError:
                return _error(400, "error parsing JSON")
            if not isinstance(parsed, dict):
                return _error(400, "error parsing JSON")
            data = parsed

        with self._lock:
            ns_name = self._ns_name(headers.get("X-Vault-Namespace"))
            ns = self._namespaces.get(ns_name) or _Namespace(ns_name)
            request = _Request(method, op, rel, query, headers, data, ns, token)

            login = self._route_login(request)
            if login is not None:
                return login

            if not token:
                return _error(403, ERR_NO_TOKEN)
            caller = self._valid_token(token)
            if caller is None or not _ns_within(ns_name, caller.namespace):
                return _error(403, ERR_INVALID_TOKEN)
            if caller.num_uses > 0:  # a use-limited token is revoked after its last use
                caller.num_uses -= 1
                if caller.num_uses == 0:
                    self._tokens.pop(caller.value, None)

            route = self._route(request, caller)
            if isinstance(route, _Reply):
                fallback = "update" if op == "update" else op
                if not self._allowed(caller, ns_name, rel, fallback):
                    return _error(403, ERR_PERMISSION_DENIED)
                return route
            if not self._allowed(caller, ns_name, rel, route.capability):
                return _error(403, ERR_PERMISSION_DENIED)
            return route.handler()

    # ------------------------------------------------------------------ ACL

    def _acl_for(self, token: _Token) -> ACL:
        policies = self._namespaces.get(token.namespace)
        return build_acl(token.policies, policies.policies if policies is not None else {})

    def _allowed(self, token: _Token, ns_name: str, path: str, capability: str) -> bool:
        if token.is_root:
            return True
        return self._acl_for(token).allows(_acl_path(token, ns_name, path), capability)

    # ------------------------------------------------------------------ envelopes

    def _envelope(
        self,
        data: Any,
        *,
        mount_type: str,
        auth: dict[str, Any] | None = None,
        warnings: list[str] | None = None,
        status: int = 200,
        raw: bool = False,
    ) -> _Reply:
        text = _ordered_json(
            [
                ("request_id", str(uuid.uuid4())),
                ("lease_id", ""),
                ("renewable", False),
                ("lease_duration", 0),
                ("data", data),
                ("wrap_info", None),
                ("warnings", warnings or None),
                ("auth", auth),
                ("mount_type", mount_type),
            ]
        )
        # respondOk uses json.Encoder (trailing newline); a raw body is json.Marshal'd.
        return _Reply(status, (text if raw else text + "\n").encode())

    # ------------------------------------------------------------------ sys

    def _sys_health(self, method: str, query: dict[str, list[str]]) -> _Reply:
        if method not in ("GET", "HEAD"):
            return _error(405)

        def code(name: str, default: int) -> int:
            raw = (query.get(name) or [""])[0]
            return int(raw) if raw.isdigit() else default

        def flag(name: str) -> bool:
            raw = (query.get(name) or [""])[0]
            return (raw == "" and name in query) or bool(_parse_bool(raw))

        standby = self._ha_state in ("standby", "performance_standby")
        perf_standby = self._ha_state == "performance_standby"
        status = code("activecode", 200)
        if not self._initialized:
            status = code("uninitcode", 501)
        elif self._sealed:
            status = code("sealedcode", 503)
        elif self._ha_state == "dr_secondary":
            status = code("drsecondarycode", 472)
        elif perf_standby:
            if not flag("perfstandbyok"):
                status = code("performancestandbycode", 473)
        elif standby and not flag("standbyok"):
            status = code("standbycode", 429)
        sealed = self._sealed or not self._initialized
        fields: list[tuple[str, Any]] = [
            ("initialized", self._initialized),
            ("sealed", sealed),
            ("standby", standby or sealed),
            ("performance_standby", perf_standby and not sealed),
            ("replication_performance_mode", "unknown" if sealed else "disabled"),
            (
                "replication_dr_mode",
                "unknown"
                if sealed
                else "secondary"
                if self._ha_state == "dr_secondary"
                else "disabled",
            ),
            ("server_time_utc", self.now_ns() // NS_PER_S),
            ("version", VAULT_VERSION),
            ("enterprise", False),
        ]
        if not sealed:
            fields += [("cluster_name", self._cluster_name), ("cluster_id", self._cluster_id)]
        fields += [("echo_duration_ms", 0), ("clock_skew_ms", 0)]
        body = None if method == "HEAD" else (_ordered_json(fields) + "\n").encode()
        return _Reply(status, body)

    def _sys_seal_status(self) -> _Reply:
        sealed = self._sealed or not self._initialized
        fields: list[tuple[str, Any]] = [
            ("type", "shamir"),
            ("initialized", self._initialized),
            ("sealed", sealed),
            ("t", 1 if self._initialized else 0),
            ("n", 1 if self._initialized else 0),
            ("progress", 0),
            ("nonce", ""),
            ("version", VAULT_VERSION),
            ("build_date", "2024-02-28T17:07:34Z"),
            ("migration", False),
        ]
        if not sealed:
            fields += [("cluster_name", self._cluster_name), ("cluster_id", self._cluster_id)]
        fields += [("recovery_seal", False), ("storage_type", "inmem")]
        return _Reply(200, (_ordered_json(fields) + "\n").encode())

    # ------------------------------------------------------------------ routing

    def _route(self, req: _Request, caller: _Token) -> _Route | _Reply:
        rel = req.path
        if rel.startswith("auth/token/"):
            return self._route_token(req, caller)
        if rel.startswith("sys/"):
            return self._route_sys(req, caller)
        mount_path = _longest_mount(req.namespace.mounts, rel)
        if mount_path is None:
            return _error(404, f'no handler for route "{rel}". route entry not found.')
        return self._route_kv(req, mount_path, req.namespace.mounts[mount_path])

    def _unsupported_operation(self) -> _Reply:
        return _error(405, ERR_UNSUPPORTED_OPERATION)

    # ------------------------------------------------------------------ KV v2

    def _is_deleted(self, version: _Version) -> bool:
        return version.deletion_ns is not None and version.deletion_ns <= self.now_ns()

    def _deletion_time(self, kv: _KVMount, meta: _KeyMeta, base_ns: int) -> int | None:
        choices = [d for d in (kv.delete_version_after_s, meta.delete_version_after_s) if d > 0]
        return base_ns + min(choices) * NS_PER_S if choices else None

    def _add_version(self, kv: _KVMount, meta: _KeyMeta, data: dict[str, Any]) -> int:
        now = self.now_ns()
        meta.current_version += 1
        meta.versions[meta.current_version] = _Version(
            data=copy.deepcopy(data),
            created_ns=now,
            deletion_ns=self._deletion_time(kv, meta, now),
        )
        meta.updated_ns = now
        if meta.created_ns is None:
            meta.created_ns = now
        keep = max(meta.max_versions, kv.max_versions) or DEFAULT_MAX_VERSIONS
        if meta.current_version - meta.oldest_version >= keep:
            to_delete = meta.current_version - keep
            for number in range(meta.oldest_version, to_delete + 1):
                meta.versions.pop(number, None)
            meta.oldest_version = to_delete + 1
        return meta.current_version

    def _version_metadata(self, meta: _KeyMeta, number: int, version: _Version) -> dict[str, Any]:
        return {
            "created_time": rfc3339_nano(version.created_ns),
            "custom_metadata": copy.deepcopy(meta.custom_metadata),
            "deletion_time": ""
            if version.deletion_ns is None
            else rfc3339_nano(version.deletion_ns),
            "destroyed": version.destroyed,
            "version": number,
        }

    def _metadata_data(self, meta: _KeyMeta) -> dict[str, Any]:
        return {
            "cas_required": meta.cas_required,
            "created_time": "" if meta.created_ns is None else rfc3339_nano(meta.created_ns),
            "current_version": meta.current_version,
            "custom_metadata": copy.deepcopy(meta.custom_metadata),
            "delete_version_after": go_duration(meta.delete_version_after_s * NS_PER_S),
            "max_versions": meta.max_versions,
            "oldest_version": meta.oldest_version,
            "updated_time": "" if meta.updated_ns is None else rfc3339_nano(meta.updated_ns),
            "versions": {
                str(number): {
                    "created_time": rfc3339_nano(v.created_ns),
                    "deletion_time": "" if v.deletion_ns is None else rfc3339_nano(v.deletion_ns),
                    "destroyed": v.destroyed,
                }
                for number, v in sorted(meta.versions.items())
            },
        }

    def _route_kv(self, req: _Request, mount_path: str, kv: _KVMount) -> _Route | _Reply:
        rest = req.path[len(mount_path) + 1 :] if req.path != mount_path else ""
        op = req.op
        if rest == "config":
            if op == "read":
                return _Route("read", lambda: self._kv_config_read(kv))
            if op == "update":
                return _Route("update", lambda: self._kv_config_write(req, kv))
            return self._unsupported_operation()
        section, sep, key = rest.partition("/")
        if not sep:
            return _error(404, ERR_UNSUPPORTED_PATH)
        if section == "data":
            if not key or key.endswith("/"):
                return _error(404, ERR_UNSUPPORTED_PATH)
            if op == "read":
                return _Route("read", lambda: self._kv_read(req, kv, key))
            if op == "update":
                capability = "update" if key in kv.keys else "create"
                return _Route(capability, lambda: self._kv_write(req, kv, key))
            if op == "patch":
                return _Route("patch", lambda: self._kv_patch(req, kv, key))
            if op == "delete":
                return _Route("delete", lambda: self._kv_delete_latest(kv, key))
            return self._unsupported_operation()
        if section == "metadata":
            if op == "list":
                return _Route("list", lambda: self._kv_list(kv, key))
            if op == "read":
                return _Route("read", lambda: self._kv_metadata_read(kv, key))
            if op == "update":
                capability = "update" if key in kv.keys else "create"
                return _Route(capability, lambda: self._kv_metadata_write(req, kv, key))
            if op == "patch":
                return _Route("patch", lambda: self._kv_metadata_patch(req, kv, key))
            if op == "delete":
                return _Route("delete", lambda: self._kv_metadata_delete(kv, key))
            return self._unsupported_operation()
        if section in ("delete", "undelete", "destroy"):
            if op != "update":
                return self._unsupported_operation()
            return _Route("update", lambda: self._kv_versions(req, kv, key, section))
        return _error(404, ERR_UNSUPPORTED_PATH)

    @staticmethod
    def _unknown_fields(body: Mapping[str, Any] | None, known: set[str]) -> list[str] | None:
        unknown = sorted(set(body or {}) - known)
        if not unknown:
            return None
        return [f"Endpoint ignored these unrecognized parameters: [{' '.join(unknown)}]"]

    def _kv_read(self, req: _Request, kv: _KVMount, key: str) -> _Reply:
        meta = kv.keys.get(key)
        if meta is None:
            return _not_found()
        number = meta.current_version
        raw_version = (req.query.get("version") or [""])[0]
        if raw_version:
            try:
                wanted = int(raw_version)
            except ValueError:
                return _error(400, _field_error("version"))
            if wanted > 0:
                number = wanted
        version = meta.versions.get(number)
        if version is None:
            return _not_found()
        payload: dict[str, Any] = {
            "data": None,
            "metadata": self._version_metadata(meta, number, version),
        }
        if self._is_deleted(version) or version.destroyed:
            # logical.RespondWithStatusCode: the whole envelope, raw, with a 404
            return self._envelope(payload, mount_type="", status=404, raw=True)
        payload["data"] = copy.deepcopy(version.data)
        return self._envelope(payload, mount_type="kv")

    def _check_and_set(self, body: Mapping[str, Any], kv: _KVMount, meta: _KeyMeta) -> str | None:
        options = body.get("options")
        if options is not None and not isinstance(options, dict):
            return 'error converting input for field "options": expected a map'
        if isinstance(options, dict) and "cas" in options:
            cas = _weak_int(options["cas"])
            if cas is None:
                return "error parsing check-and-set parameter"
            if cas != meta.current_version:
                return ERR_CAS_MISMATCH
        elif kv.cas_required or meta.cas_required:
            return ERR_CAS_REQUIRED
        return None

    def _write_reply(self, meta: _KeyMeta, warnings: list[str] | None) -> _Reply:
        number = meta.current_version
        return self._envelope(
            self._version_metadata(meta, number, meta.versions[number]),
            mount_type="kv",
            warnings=warnings,
        )

    def _kv_write(self, req: _Request, kv: _KVMount, key: str) -> _Reply:
        body = req.body or {}
        data = body.get("data")
        if data is None:
            return _error(400, "no data provided")
        if not isinstance(data, dict):
            return _error(400, 'error converting input for field "data": expected a map')
        meta = kv.keys.get(key) or _KeyMeta()
        problem = self._check_and_set(body, kv, meta)
        if problem is not None:
            return _error(400, problem)
        kv.keys[key] = meta
        self._add_version(kv, meta, data)
        return self._write_reply(meta, self._unknown_fields(body, {"data", "options", "version"}))

    def _kv_patch(self, req: _Request, kv: _KVMount, key: str) -> _Reply:
        body = req.body or {}
        if "data" not in body:
            return _error(400, "no data provided")
        meta = kv.keys.get(key)
        empty_404 = _Reply(404, b"", "application/json")
        if meta is None:
            return empty_404
        problem = self._check_and_set(body, kv, meta)
        if problem is not None:
            return _error(400, problem)
        current = meta.versions.get(meta.current_version)
        if current is None:
            return empty_404
        if self._is_deleted(current) or current.destroyed:
            return self._envelope(
                self._version_metadata(meta, meta.current_version, current),
                mount_type="",
                status=404,
                raw=True,
            )
        patch = body["data"]
        if not isinstance(patch, dict):
            return _error(400, 'error converting input for field "data": expected a map')
        merged = _merge_patch(copy.deepcopy(current.data or {}), patch)
        self._add_version(kv, meta, merged)
        return self._write_reply(meta, self._unknown_fields(body, {"data", "options", "version"}))

    def _kv_delete_latest(self, kv: _KVMount, key: str) -> _Reply:
        meta = kv.keys.get(key)
        if meta is None:
            return _no_content()
        latest = meta.versions.get(meta.current_version)
        if latest is None or latest.destroyed or self._is_deleted(latest):
            return _no_content()
        latest.deletion_ns = self.now_ns()
        return _no_content()

    def _kv_versions(self, req: _Request, kv: _KVMount, key: str, action: str) -> _Reply:
        numbers = _parse_versions((req.body or {}).get("versions"))
        if numbers is None:
            return _error(
                400,
                _field_error("versions"),
            )
        if not numbers:
            message = (
                "no version number provided"
                if action == "destroy"
                else ("No version number provided")
            )
            return _error(400, message)
        meta = kv.keys.get(key)
        if meta is None:
            return _no_content()
        now = self.now_ns()
        for number in numbers:
            version = meta.versions.get(number)
            if version is None or version.destroyed:
                continue
            if action == "delete":
                if not self._is_deleted(version):
                    version.deletion_ns = now
            elif action == "undelete":
                version.deletion_ns = self._deletion_time(kv, meta, now)
            else:
                version.destroyed = True
                version.data = None
        warnings = self._unknown_fields(req.body, {"versions"})
        return (
            self._envelope(None, mount_type="kv", warnings=warnings)
            if warnings
            else (_no_content())
        )

    def _kv_list(self, kv: _KVMount, prefix: str) -> _Reply:
        children: set[str] = set()
        for key in kv.keys:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if not rest:
                continue
            head, slash, _tail = rest.partition("/")
            children.add(head + "/" if slash else head)
        if not children:
            return _not_found()
        return self._envelope({"keys": sorted(children)}, mount_type="kv")

    def _kv_metadata_read(self, kv: _KVMount, key: str) -> _Reply:
        meta = kv.keys.get(key)
        if meta is None:
            return _not_found()
        return self._envelope(self._metadata_data(meta), mount_type="kv")

    def _parse_metadata_fields(
        self, body: Mapping[str, Any], *, patch: bool
    ) -> tuple[dict[str, Any], str | None]:
        out: dict[str, Any] = {}
        if "max_versions" in body:
            value = _weak_int(body["max_versions"])
            if value is None or value < 0:
                return (
                    out,
                    _field_error("max_versions"),
                )
            out["max_versions"] = value
        if "cas_required" in body:
            flag = body["cas_required"]
            parsed = flag if isinstance(flag, bool) else _parse_bool(str(flag))
            if parsed is None:
                return (
                    out,
                    _field_error("cas_required"),
                )
            out["cas_required"] = parsed
        if "delete_version_after" in body:
            try:
                seconds = parse_duration_seconds(body["delete_version_after"])
            except ValueError:
                return out, _field_error("delete_version_after")
            if seconds < 0:
                return out, "delete_version_after cannot be negative"
            out["delete_version_after"] = seconds
        if "custom_metadata" in body:
            raw = body["custom_metadata"]
            if raw is None and patch:
                out["custom_metadata"] = None
            elif not isinstance(raw, dict):
                return out, "custom_metadata validation failed: expected a map"
            else:
                problem = _validate_custom_metadata(raw, patch=patch)
                if problem is not None:
                    return out, problem
                out["custom_metadata"] = raw
        return out, None

    def _kv_metadata_write(self, req: _Request, kv: _KVMount, key: str) -> _Reply:
        body = req.body or {}
        if not key:
            return _error(400, "missing path")
        fields, problem = self._parse_metadata_fields(body, patch=False)
        if problem is not None:
            return _error(400, problem)
        known = {"max_versions", "cas_required", "delete_version_after", "custom_metadata"}
        warnings = list(self._unknown_fields(body, known) or [])
        if not fields:
            return (
                self._envelope(None, mount_type="kv", warnings=warnings)
                if warnings
                else (_no_content())
            )
        if fields.get("cas_required") is False and kv.cas_required:
            warnings.append(
                '"cas_required" set to false, but is mandated by backend config. '
                "This value will be ignored."
            )
        meta = kv.keys.get(key)
        if meta is None:
            now = self.now_ns()
            meta = _KeyMeta(created_ns=now, updated_ns=now)
            kv.keys[key] = meta
        if "max_versions" in fields:
            meta.max_versions = fields["max_versions"]
        if "cas_required" in fields:
            meta.cas_required = fields["cas_required"]
        if "delete_version_after" in fields:
            meta.delete_version_after_s = fields["delete_version_after"]
        if "custom_metadata" in fields:
            meta.custom_metadata = {k: _weak_str(v) for k, v in fields["custom_metadata"].items()}
        if warnings:
            return self._envelope(None, mount_type="kv", warnings=warnings)
        return _no_content()

    def _kv_metadata_patch(self, req: _Request, kv: _KVMount, key: str) -> _Reply:
        body = req.body or {}
        if not key:
            return _error(400, "missing path")
        fields, problem = self._parse_metadata_fields(body, patch=True)
        if problem is not None:
            return _error(400, problem)
        meta = kv.keys.get(key)
        if meta is None:
            return _Reply(404, b"", "application/json")
        if "max_versions" in fields:
            meta.max_versions = fields["max_versions"]
        if "cas_required" in fields:
            meta.cas_required = fields["cas_required"]
        if "delete_version_after" in fields:
            meta.delete_version_after_s = fields["delete_version_after"]
        if "custom_metadata" in fields:
            patch = fields["custom_metadata"]
            if patch is None:
                meta.custom_metadata = None
            else:
                merged = dict(meta.custom_metadata or {})
                for k, v in patch.items():
                    if v is None:
                        merged.pop(k, None)
                    else:
                        merged[k] = _weak_str(v)
                meta.custom_metadata = merged
        return _no_content()

    def _kv_metadata_delete(self, kv: _KVMount, key: str) -> _Reply:
        kv.keys.pop(key, None)
        return _no_content()

    def _kv_config_read(self, kv: _KVMount) -> _Reply:
        return self._envelope(
            {
                "cas_required": kv.cas_required,
                "delete_version_after": go_duration(kv.delete_version_after_s * NS_PER_S),
                "max_versions": kv.max_versions,
            },
            mount_type="kv",
        )

    def _kv_config_write(self, req: _Request, kv: _KVMount) -> _Reply:
        fields, problem = self._parse_metadata_fields(
            {k: v for k, v in (req.body or {}).items() if k != "custom_metadata"}, patch=False
        )
        if problem is not None:
            return _error(400, problem)
        if "max_versions" in fields:
            kv.max_versions = fields["max_versions"]
        if "cas_required" in fields:
            kv.cas_required = fields["cas_required"]
        if "delete_version_after" in fields:
            kv.delete_version_after_s = fields["delete_version_after"]
        return _no_content()

    # ------------------------------------------------------------------ tokens over HTTP

    def _lookup_data(self, token: _Token) -> dict[str, Any]:
        now = self.now_ns()
        data: dict[str, Any] = {
            "accessor": token.accessor,
            "creation_time": token.issue_ns // NS_PER_S,
            "creation_ttl": token.creation_ttl_s,
            "display_name": token.display_name,
            "entity_id": token.entity_id,
            "expire_time": None if token.expire_ns is None else rfc3339_nano(token.expire_ns),
            "explicit_max_ttl": token.explicit_max_ttl_s,
            "id": token.value,
            "issue_time": rfc3339_nano(token.issue_ns),
            "meta": copy.deepcopy(token.meta),
            "num_uses": token.num_uses,
            "orphan": token.orphan,
            "path": token.path,
            "policies": list(token.policies),
            "renewable": token.renewable,
            "ttl": 0 if token.expire_ns is None else max(0, (token.expire_ns - now) // NS_PER_S),
            "type": "service",
        }
        if token.last_renewal_ns is not None:
            data["last_renewal"] = rfc3339_nano(token.last_renewal_ns)
            data["last_renewal_time"] = token.last_renewal_ns // NS_PER_S
        return data

    def _auth_block(self, token: _Token, ttl_s: int) -> dict[str, Any]:
        """The auth block; lease_duration is the TTL granted (Auth.TTL), not a countdown."""
        return {
            "client_token": token.value,
            "accessor": token.accessor,
            "policies": list(token.policies),
            "token_policies": list(token.policies),
            "metadata": copy.deepcopy(token.meta),
            "lease_duration": ttl_s,
            "renewable": token.renewable,
            "entity_id": token.entity_id,
            "token_type": "service",
            "orphan": token.orphan,
            "mfa_requirement": None,
            "num_uses": token.num_uses,
        }

    def _route_token(self, req: _Request, caller: _Token) -> _Route | _Reply:
        name = req.path[len("auth/token/") :]
        op = req.op
        if name == "lookup-self":
            if op in ("read", "update"):
                return _Route(
                    op, lambda: self._envelope(self._lookup_data(caller), mount_type="token")
                )
            return self._unsupported_operation()
        if name == "renew-self":
            if op == "update":
                return _Route("update", lambda: self._renew_self(req, caller))
            return self._unsupported_operation()
        if name == "revoke-self":
            if op == "update":
                return _Route("update", lambda: self._revoke_self(caller))
            return self._unsupported_operation()
        if name == "create":
            if op == "update":
                return _Route("update", lambda: self._token_create(req, caller))
            return self._unsupported_operation()
        return _error(404, ERR_UNSUPPORTED_PATH)

    def _renew_self(self, req: _Request, caller: _Token) -> _Reply:
        body = req.body or {}
        try:
            increment = parse_duration_seconds(body.get("increment", 0))
        except ValueError:
            return _error(400, _field_error("increment"))
        if not caller.renewable or caller.expire_ns is None:
            return _error(400, "lease is not renewable")
        now = self.now_ns()
        wanted = increment if increment > 0 else caller.creation_ttl_s
        new_expire = now + wanted * NS_PER_S
        warnings: list[str] | None = None
        if caller.max_expire_ns is not None and new_expire > caller.max_expire_ns:
            new_expire = caller.max_expire_ns
            if increment > 0:
                remaining = ((caller.max_expire_ns - now) // NS_PER_S) * NS_PER_S
                warnings = [
                    f'TTL of "{go_duration(wanted * NS_PER_S)}" exceeded the effective max_ttl of '
                    f'"{go_duration(remaining)}"; TTL value is capped accordingly'
                ]
        caller.expire_ns = new_expire
        caller.last_renewal_ns = now
        granted = (new_expire - now) // NS_PER_S
        return self._envelope(
            None, mount_type="token", auth=self._auth_block(caller, granted), warnings=warnings
        )

    def _revoke_self(self, caller: _Token) -> _Reply:
        self._tokens.pop(caller.value, None)
        return _no_content()

    def _token_create(self, req: _Request, caller: _Token) -> _Reply:
        body = req.body or {}
        raw_policies = body.get("policies", [])
        if isinstance(raw_policies, str):
            raw_policies = [p for p in raw_policies.split(",") if p.strip()]
        if not isinstance(raw_policies, list) or not all(isinstance(p, str) for p in raw_policies):
            return _error(400, _field_error("policies"))
        policies = [p.strip().lower() for p in raw_policies] or list(caller.policies)
        if not caller.is_root and not set(policies) - {"default"} <= set(caller.policies):
            return _error(400, "child policies must be subset of parent")
        try:
            ttl = parse_duration_seconds(body.get("ttl", 0))
            max_ttl = parse_duration_seconds(body.get("explicit_max_ttl", 0))
        except ValueError:
            return _error(400, "invalid ttl")
        if "root" in policies and not caller.is_root:
            return _error(400, "root tokens may not be created without parent token being root")
        renewable_raw = body.get("renewable", True)
        renewable = (
            renewable_raw
            if isinstance(renewable_raw, bool)
            else bool(_parse_bool(str(renewable_raw)))
        )
        meta = body.get("meta")
        display = str(body.get("display_name") or "")
        token = self._issue(
            namespace=req.namespace.path,
            policies=policies,
            ttl_s=ttl,
            max_ttl_s=max_ttl,
            renewable=renewable,
            display_name="token-" + display if display else "token",
            path="auth/token/create",
            meta={str(k): _weak_str(v) for k, v in meta.items()}
            if isinstance(meta, dict)
            else None,
            orphan=bool(body.get("no_parent")) and caller.is_root,
            no_default_policy=bool(body.get("no_default_policy")),
        )
        return self._envelope(
            None, mount_type="token", auth=self._auth_block(token, token.creation_ttl_s)
        )

    # ------------------------------------------------------------------ sys over HTTP

    def _route_sys(self, req: _Request, caller: _Token) -> _Route | _Reply:
        rel = req.path
        op = req.op
        ns = req.namespace
        if rel == "sys/capabilities-self":
            if op != "update":
                return self._unsupported_operation()
            return _Route("update", lambda: self._capabilities_self(req, caller))
        if rel == "sys/policy" and op == "read":
            return _Route("read", lambda: self._policy_list(ns, legacy=True))
        for prefix, legacy in (("sys/policies/acl/", False), ("sys/policy/", True)):
            if rel.startswith(prefix):
                name = rel[len(prefix) :].strip("/").lower()
                return self._route_policy(req, ns, name, legacy=legacy)
        return _error(404, f'no handler for route "{rel}". route entry not found.')

    def _route_policy(
        self, req: _Request, ns: _Namespace, name: str, *, legacy: bool
    ) -> _Route | _Reply:
        op = req.op
        if op == "list":
            return _Route("list", lambda: self._policy_list(ns, legacy=legacy))
        if not name:
            return _error(404, ERR_UNSUPPORTED_PATH)
        if op == "read":
            return _Route("read", lambda: self._policy_read(ns, name, legacy))
        if op == "update":
            return _Route("update", lambda: self._policy_write(req, ns, name))
        if op == "delete":
            return _Route("delete", lambda: self._policy_delete(ns, name))
        return self._unsupported_operation()

    def _policy_list(self, ns: _Namespace, *, legacy: bool) -> _Reply:
        keys = sorted([*ns.policies, "root"])
        data: dict[str, Any] = {"keys": keys}
        if legacy:
            data["policies"] = keys
        return self._envelope(data, mount_type="system")

    def _capabilities_self(self, req: _Request, caller: _Token) -> _Reply:
        body = req.body or {}
        paths = body.get("paths", body.get("path"))
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            return _error(400, "paths must be supplied")
        result: dict[str, Any] = {}
        for path in paths:
            if caller.is_root:
                caps = ["root"]
            else:
                found = self._acl_for(caller).capabilities(
                    _acl_path(caller, req.namespace.path, path.lstrip("/"))
                )
                caps = ["deny"] if not found or "deny" in found else sorted(found)
            result[path] = caps
        if len(paths) == 1:
            result["capabilities"] = result[paths[0]]
        return self._envelope(result, mount_type="system")

    def _policy_read(self, ns: _Namespace, name: str, legacy: bool) -> _Reply:
        if name == "root":
            return _error(400, 'cannot read "root" policy')
        policy = ns.policies.get(name)
        if policy is None:
            return _not_found()
        key = "rules" if legacy else "policy"
        return self._envelope({"name": name, key: policy.text}, mount_type="system")

    def _policy_write(self, req: _Request, ns: _Namespace, name: str) -> _Reply:
        body = req.body or {}
        text = body.get("policy", body.get("rules"))
        if not isinstance(text, str):
            return _error(400, "'policy' parameter not supplied or empty")
        if name == "root":
            return _error(400, "cannot update root policy")
        try:
            ns.policies[name] = parse_policy(name, text)
        except PolicyError as exc:
            return _error(400, f"failed to parse policy: {exc}")
        return _no_content()

    def _policy_delete(self, ns: _Namespace, name: str) -> _Reply:
        if name == "default":
            return _error(400, "cannot delete default policy")
        if name == "root":
            return _error(400, "cannot delete root policy")
        ns.policies.pop(name, None)
        return _no_content()

    # ------------------------------------------------------------------ login

    def _route_login(self, req: _Request) -> _Reply | None:
        match = re.fullmatch(r"auth/(.+)/login/?", req.path)
        if match is None:
            return None
        mount = match.group(1)
        ns = req.namespace
        if mount in ns.approle_mounts:
            if req.op != "update":
                return self._unsupported_operation()
            return self._approle_login(req, mount, ns.approle_mounts[mount])
        if mount in ns.kubernetes_mounts:
            if req.op != "update":
                return self._unsupported_operation()
            return self._kubernetes_login(req, mount, ns.kubernetes_mounts[mount])
        return None

    def _login_reply(self, token: _Token, mount_type: str) -> _Reply:
        auth = self._auth_block(token, token.creation_ttl_s)
        return self._envelope(None, mount_type=mount_type, auth=auth)

    def _approle_login(self, req: _Request, mount: str, roles: dict[str, _AppRole]) -> _Reply:
        body = req.body or {}
        role_id = body.get("role_id")
        if not isinstance(role_id, str) or not role_id.strip():
            return _error(400, "missing role_id")
        role = next((r for r in roles.values() if r.role_id == role_id.strip()), None)
        if role is None:
            return _error(400, ERR_APPROLE_LOGIN)
        if role.bind_secret_id:
            secret_id = body.get("secret_id")
            if not isinstance(secret_id, str) or not secret_id.strip():
                return _error(400, "missing secret_id")
            entry = role.secret_ids.get(secret_id.strip())
            if entry is None:
                return _error(400, ERR_APPROLE_LOGIN)
            if entry.expire_ns is not None and entry.expire_ns <= self.now_ns():
                del role.secret_ids[secret_id.strip()]
                return _error(400, ERR_APPROLE_LOGIN)
            if entry.num_uses > 0:
                entry.num_uses -= 1
                if entry.num_uses == 0:
                    del role.secret_ids[secret_id.strip()]
        token = self._issue(
            namespace=req.namespace.path,
            policies=role.policies,
            ttl_s=role.token_ttl_s,
            max_ttl_s=role.token_max_ttl_s,
            renewable=True,
            display_name="approle",
            path=f"auth/{mount}/login",
            meta={"role_name": role.name},
            entity_id=role.entity_id,
            num_uses=role.token_num_uses,
        )
        return self._login_reply(token, "approle")

    def _kubernetes_login(
        self, req: _Request, mount: str, roles: dict[str, _KubernetesRole]
    ) -> _Reply:
        body = req.body or {}
        role_name = body.get("role")
        if not isinstance(role_name, str) or not role_name:
            return _error(400, "missing role")
        jwt = body.get("jwt")
        if not isinstance(jwt, str) or not jwt:
            return _error(400, "missing jwt")
        role = roles.get(role_name)
        if role is None:
            return _error(400, f'invalid role name "{role_name}"')
        claims = self._jwt_claims(jwt, role)
        if claims is None:
            return _error(403, ERR_NO_TOKEN)
        k8s = claims.get("kubernetes.io") or {}
        account = (k8s.get("serviceaccount") or {}) if isinstance(k8s, dict) else {}
        sa_name = str(account.get("name", ""))
        sa_uid = str(account.get("uid", ""))
        sa_namespace = str(k8s.get("namespace", "")) if isinstance(k8s, dict) else ""
        if role.service_accounts != ["*"] and not _glob_any(role.service_accounts, sa_name):
            return _error(403, "service account name not authorized")
        if not role.namespaces or not (
            role.namespaces[0] == "*" or _glob_any(role.namespaces, sa_namespace)
        ):
            return _error(403, "namespace not authorized")
        if not self._jwt_signature_ok(jwt):  # the TokenReview step
            return _error(403, ERR_NO_TOKEN)
        entity = role.entity_ids.setdefault(sa_uid, str(uuid.uuid4()))
        token = self._issue(
            namespace=req.namespace.path,
            policies=role.policies,
            ttl_s=role.token_ttl_s,
            max_ttl_s=role.token_max_ttl_s,
            renewable=True,
            display_name=f"{mount}-{sa_namespace}-{sa_name}",
            path=f"auth/{mount}/login",
            meta={
                "role": role.name,
                "service_account_name": sa_name,
                "service_account_namespace": sa_namespace,
                "service_account_secret_name": "",
                "service_account_uid": sa_uid,
            },
            entity_id=entity,
        )
        return self._login_reply(token, "kubernetes")

    def _jwt_claims(self, jwt: str, role: _KubernetesRole) -> dict[str, Any] | None:
        parts = jwt.split(".")
        if len(parts) != 3:
            return None
        try:
            claims = json.loads(_b64url_decode(parts[1]))
        except (ValueError, TypeError):
            return None
        if not isinstance(claims, dict):
            return None
        now_s = self.now_ns() // NS_PER_S
        exp = claims.get("exp")
        if isinstance(exp, int | float) and exp <= now_s:
            return None
        if role.audience is not None:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if role.audience not in auds:
                return None
        return claims

    def _jwt_signature_ok(self, jwt: str) -> bool:
        signing_input, _, signature = jwt.rpartition(".")
        expected = _b64url(hmac.new(self._jwt_key, signing_input.encode(), hashlib.sha256).digest())
        return hmac.compare_digest(expected, signature)


# --------------------------------------------------------------------------- helpers


def _field_error(name: str) -> str:
    return f'1 error occurred:\n\t* error converting input for field "{name}"\n\n'


def _parse_bool(text: str) -> bool | None:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _weak_int(value: Any) -> int | None:
    """mapstructure.WeakDecode into an int."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return 0
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
    return None


def _weak_str(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _parse_versions(raw: Any) -> list[int] | None:
    """framework.TypeCommaIntSlice: [1, 2], ["1", "2"], "1,2", 3."""
    if raw is None:
        return []
    items: list[Any]
    if isinstance(raw, list):
        items = raw
    elif isinstance(raw, str):
        items = [p for p in raw.split(",") if p.strip()]
    else:
        items = [raw]
    out: list[int] = []
    for item in items:
        number = _weak_int(item)
        if number is None:
            return None
        out.append(number)
    return out


def _merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch: null removes, objects merge recursively, the rest replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            existing = target.get(key)
            target[key] = _merge_patch(existing if isinstance(existing, dict) else {}, value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _validate_custom_metadata(raw: Mapping[str, Any], *, patch: bool) -> str | None:
    prefix = "custom_metadata validation failed"
    values = {k: v for k, v in raw.items() if not (patch and v is None)}
    if len(values) > 64:
        return f"{prefix}: payload must contain at most 64 keys, provided {len(values)}"
    problems: list[str] = []
    for key, value in values.items():
        text = _weak_str(value)
        if not 0 < len(key) <= 128:
            problems.append(
                f'{prefix}: length of key "{key}" is {len(key)} but must be 0 < len(key) <= 128'
            )
        if not 0 < len(text) <= 512:
            problems.append(
                f'{prefix}: length of value for key "{key}" is {len(text)} but must be '
                "0 < len(value) <= 512"
            )
    if not problems:
        return None
    noun = "error" if len(problems) == 1 else "errors"
    return f"{len(problems)} {noun} occurred:\n" + "".join(f"\t* {p}\n" for p in problems) + "\n"


def _glob_any(patterns: Sequence[str], value: str) -> bool:
    """strutil.StrListContainsGlob: "*" matches any run of characters."""
    for pattern in patterns:
        regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
        if re.match(regex, value):
            return True
    return False


def _longest_mount(mounts: Mapping[str, _KVMount], path: str) -> str | None:
    best: str | None = None
    for mount in mounts:
        if (path == mount or path.startswith(mount + "/")) and (
            best is None or len(mount) > len(best)
        ):
            best = mount
    return best


def _ns_within(request_ns: str, token_ns: str) -> bool:
    """A token is usable in its own namespace and in the namespaces below it."""
    return token_ns == "" or request_ns == token_ns or request_ns.startswith(token_ns + "/")


def _acl_path(token: _Token, request_ns: str, path: str) -> str:
    """The path a token's policies see: a child namespace's path is prefixed with it."""
    relative = request_ns[len(token.namespace) :].strip("/")
    return f"{relative}/{path}" if relative else path
