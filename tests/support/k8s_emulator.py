"""An HTTP-level Kubernetes API server emulator for tests (no API server can be installed here).

It reproduces ``/work/shared/reference/kubernetes.md`` for the three core/v1
kinds the broker touches, namespaces, secrets and serviceaccounts, as the
official Python client sees them: paths, verbs, ``Status`` error bodies,
resourceVersion preconditions, the four PATCH content types (RFC 6902 JSON
patch, RFC 7386 merge patch, strategic merge patch with ServiceAccount
``imagePullSecrets`` atomic, a minimal server-side apply), ``dryRun=All``,
unknown-field warnings, Secret validation, label and field selectors, the
delayed ``default`` service account and namespace termination. Its own tests
(tests/integration/test_k8s_emulator.py) pin those behaviours through the
official client, so drift from a real API server fails there first.

Usage::

    with K8sEmulator() as emu:                       # plain HTTP on 127.0.0.1, bearer token
        emu.write_kubeconfig(tmp_path / "kubeconfig", context_name="emu")
        api_client = kubernetes.config.new_client_from_config(
            config_file=str(tmp_path / "kubeconfig"), context="emu", persist_config=False
        )
        core = kubernetes.client.CoreV1Api(api_client)
        ...
        api_client.close()

Test controls are Python methods, never HTTP: ``create_namespace``,
``get_object``/``put_object``/``mutate_object``/``delete_object``,
``resource_version``, ``forbid_namespace``/``forbid_cluster_scope``,
``inject`` (faults), ``before_write`` (a hook between a client's read and its
write, to force a 409 race), ``settle`` (run pending controller work now) and
the request log ``requests``.

Where the emulator is simpler than a real server (documented, not hidden):
no watch, no ``managedFields`` and no field ownership (apply is a merge patch
that may create), only the three kinds above, no admission webhooks, no
quotas. The controllers (default service account, namespace finalizer) run
lazily: pending work is done at the start of each request or control call
once its delay has passed, so no background thread touches the store.

Only the standard library, PyYAML (a dependency of the kubernetes client, for
``application/apply-patch+yaml`` and the kubeconfig) and, for the optional
TLS listener, tests.support.certificates are used. The server listens on
127.0.0.1 with an ephemeral port, one thread per connection; ``stop()`` closes
every connection and joins every thread (bounded). The bearer token never
reaches the request log.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import os
import re
import secrets
import socket
import ssl
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from tests.support.certificates import CertificateAuthority
from tests.support.emulator_server import (
    EmulatorRequestHandler,
    EmulatorServer,
    ServedEmulator,
)

__all__ = [
    "APPLY_PATCH",
    "GENERIC_INVALID_MESSAGE",
    "JSON_PATCH",
    "MERGE_PATCH",
    "OPTIMISTIC_LOCK_MESSAGE",
    "STRATEGIC_MERGE_PATCH",
    "InClusterFiles",
    "InjectedFault",
    "K8sCluster",
    "K8sEmulator",
    "RequestRecord",
    "apply_json_patch",
    "apply_merge_patch",
    "apply_strategic_merge_patch",
    "parse_label_selector",
]

KUBERNETES_VERSION = "v1.37.0"
MAX_REQUEST_BYTES = 3 * 1024 * 1024  # the apiserver's request body limit
MAX_SECRET_BYTES = 1024 * 1024
MAX_ANNOTATION_BYTES = 256 * 1024
MAX_LOG_RECORDS = 10_000
DEFAULT_USER = "system:serviceaccount:credbroker:credbroker"

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH)
BODY_TYPES = ("application/json", "application/yaml", "application/vnd.kubernetes.protobuf")

GENERIC_INVALID_MESSAGE = "the server rejected our request due to an error in our request"
OPTIMISTIC_LOCK_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
NAMESPACE_PURGE_MESSAGE = (
    "The system is ensuring all content is removed from this namespace.  "
    "Upon completion, this namespace will automatically be purged by the system."
)
BUILTIN_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")
UNDELETABLE_NAMESPACES = frozenset({"default", "kube-public", "kube-system"})
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

JSON = dict[str, Any]
Verb = Literal["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
DefaultServiceAccount = Literal["now", "delayed", "never"]
_VERBS = frozenset(
    {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
)

_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # utilrand.String's alphabet


# --------------------------------------------------------------------------- JSON the Go way


def _go_json(value: Any) -> str:
    """Compact JSON the way Go's encoding/json writes it (UTF-8, HTML-escaped), keys as given."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text


def _go_quote(value: str) -> str:
    """Go's %q for the strings in validation messages (close enough for ASCII)."""
    return json.dumps(value, ensure_ascii=False)


def _timestamp(epoch: float | None = None) -> str:
    """metav1.Time: RFC 3339 in UTC, whole seconds."""
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- schemas

# Leaf types of the decoding schema; a dict is an object with known fields, a
# one-element list an array of that schema. The object schemas' key order is
# the Go struct order the real server writes fields in.
_STR = "string"
_BOOL = "bool"
_INT = "int64"
_TIME = "time"
_STRMAP = "map[string]string"
_BYTESMAP = "map[string][]uint8"
_ANY = "any"

_OWNER_REFERENCE: JSON = {
    "apiVersion": _STR,
    "kind": _STR,
    "name": _STR,
    "uid": _STR,
    "controller": _BOOL,
    "blockOwnerDeletion": _BOOL,
}
_OBJECT_META: JSON = {
    "name": _STR,
    "generateName": _STR,
    "namespace": _STR,
    "selfLink": _STR,
    "uid": _STR,
    "resourceVersion": _STR,
    "generation": _INT,
    "creationTimestamp": _TIME,
    "deletionTimestamp": _TIME,
    "deletionGracePeriodSeconds": _INT,
    "labels": _STRMAP,
    "annotations": _STRMAP,
    "ownerReferences": [_OWNER_REFERENCE],
    "finalizers": [_STR],
    "managedFields": _ANY,
}
_OBJECT_REFERENCE: JSON = {
    "kind": _STR,
    "namespace": _STR,
    "name": _STR,
    "uid": _STR,
    "apiVersion": _STR,
    "resourceVersion": _STR,
    "fieldPath": _STR,
}
_SECRET_SCHEMA: JSON = {
    "kind": _STR,
    "apiVersion": _STR,
    "metadata": _OBJECT_META,
    "immutable": _BOOL,
    "data": _BYTESMAP,
    "stringData": _STRMAP,
    "type": _STR,
}
_SERVICE_ACCOUNT_SCHEMA: JSON = {
    "kind": _STR,
    "apiVersion": _STR,
    "metadata": _OBJECT_META,
    "secrets": [_OBJECT_REFERENCE],
    "imagePullSecrets": [{"name": _STR}],
    "automountServiceAccountToken": _BOOL,
}
_NAMESPACE_SCHEMA: JSON = {
    "kind": _STR,
    "apiVersion": _STR,
    "metadata": _OBJECT_META,
    "spec": {"finalizers": [_STR]},
    "status": {
        "phase": _STR,
        "conditions": [
            {
                "type": _STR,
                "status": _STR,
                "lastTransitionTime": _TIME,
                "reason": _STR,
                "message": _STR,
            }
        ],
    },
}

# Strategic merge patch: lists with a patch strategy. A merge key merges items
# by that key; "" merges a list of scalars as a set. Every other list (notably
# ServiceAccount.imagePullSecrets) is atomic: a patch replaces it whole.
_META_LISTS = {"metadata.finalizers": "", "metadata.ownerReferences": "uid"}


@dataclass(frozen=True)
class _Kind:
    resource: str
    kind: str
    namespaced: bool
    schema: JSON
    merge_lists: Mapping[str, str]
    field_selectors: tuple[str, ...]


SECRETS = _Kind(
    "secrets",
    "Secret",
    True,
    _SECRET_SCHEMA,
    _META_LISTS,
    ("metadata.name", "metadata.namespace", "type"),
)
SERVICE_ACCOUNTS = _Kind(
    "serviceaccounts",
    "ServiceAccount",
    True,
    _SERVICE_ACCOUNT_SCHEMA,
    {**_META_LISTS, "secrets": "name"},
    ("metadata.name", "metadata.namespace"),
)
NAMESPACES = _Kind(
    "namespaces",
    "Namespace",
    False,
    _NAMESPACE_SCHEMA,
    {**_META_LISTS, "status.conditions": "type"},
    ("metadata.name", "status.phase"),
)
_KINDS = {k.resource: k for k in (SECRETS, SERVICE_ACCOUNTS, NAMESPACES)}
_KIND_ALIASES = {
    "secret": SECRETS,
    "secrets": SECRETS,
    "serviceaccount": SERVICE_ACCOUNTS,
    "serviceaccounts": SERVICE_ACCOUNTS,
    "sa": SERVICE_ACCOUNTS,
    "namespace": NAMESPACES,
    "namespaces": NAMESPACES,
    "ns": NAMESPACES,
}


def _kind_of(kind: str) -> _Kind:
    """Accept "secrets", "Secret", "secret" (and "sa", "ns")."""
    try:
        return _KIND_ALIASES[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}: secrets, serviceaccounts or namespaces") from None


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator received. Never holds the bearer token."""

    method: str
    path: str  # URL path without the query, e.g. "/api/v1/namespaces/ns/secrets/x"
    query: str  # raw query string ("" when none)
    content_type: str | None  # the Content-Type header as sent (None when absent)
    body: bytes  # the request body as received
    token_present: bool  # an Authorization header was sent
    status: int | None  # None when the connection was dropped

    @property
    def params(self) -> dict[str, list[str]]:
        """The query parsed (blank values kept)."""
        return parse_qs(self.query, keep_blank_values=True)

    def json(self) -> Any:
        """The body parsed as JSON (None when empty)."""
        return json.loads(self.body) if self.body else None


@dataclass
class InjectedFault:
    """A fault armed with K8sEmulator.inject(); ``hits`` counts the requests it hit."""

    path_regex: re.Pattern[str] | None
    method: str | None
    status: int | None
    delay: float
    drop: bool
    message: str | None
    retry_after: int | None
    remaining: int | None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.path_regex is None or self.path_regex.search(path) is not None


@dataclass(frozen=True)
class InClusterFiles:
    """What a pod would see: the service env variables, a token file and the CA file.

    Use with ``kubernetes.config.incluster_config.InClusterConfigLoader(
    token_filename=..., cert_filename=..., environ=environ)``; only a TLS
    emulator can serve it (the client forces https for in-cluster config).
    """

    host: str
    port: int
    token_file: Path
    ca_file: Path

    @property
    def environ(self) -> dict[str, str]:
        return {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self.port)}


@dataclass(frozen=True)
class _ForbidRule:
    namespace: str | None  # None: cluster-scoped requests
    resources: frozenset[str] | None
    verbs: frozenset[str] | None

    def matches(self, namespace: str | None, resource: str, verb: str) -> bool:
        return (
            self.namespace == namespace
            and (self.resources is None or resource in self.resources)
            and (self.verbs is None or verb in self.verbs)
        )


@dataclass
class _Hook:
    fn: Callable[[], None]
    resource: str | None
    namespace: str | None
    name: str | None
    remaining: int

    def matches(self, resource: str, namespace: str | None, name: str | None) -> bool:
        return (
            (self.resource is None or self.resource == resource)
            and (self.namespace is None or self.namespace == namespace)
            and (self.name is None or self.name == name)
        )


# --------------------------------------------------------------------------- replies & errors


@dataclass
class _Reply:
    status: int
    body: bytes | None = None
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json_reply(status: int, value: Any, headers: Sequence[tuple[str, str]] = ()) -> _Reply:
    return _Reply(status, (_go_json(value) + "\n").encode(), "application/json", list(headers))


def _status_body(
    code: int, reason: str, message: str, details: JSON | None = None, *, success: bool = False
) -> JSON:
    """metav1.Status in Go field order; empty reason/message/details are omitted like Go does."""
    body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}}
    body["status"] = "Success" if success else "Failure"
    if message:
        body["message"] = message
    if reason:
        body["reason"] = reason
    if details is not None:
        body["details"] = details
    if code:
        body["code"] = code
    return body


class _ApiError(Exception):
    """Raised inside request handling; carries the Status reply."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _fail(
    code: int,
    reason: str,
    message: str,
    details: JSON | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> _ApiError:
    return _ApiError(_json_reply(code, _status_body(code, reason, message, details), headers))


def _details(name: str | None, kind: str, **extra: Any) -> JSON:
    """StatusDetails in Go field order (name, group, kind, uid, causes, retryAfterSeconds)."""
    out: JSON = {}
    if name:
        out["name"] = name
    if extra.get("group"):
        out["group"] = extra["group"]
    if kind:
        out["kind"] = kind
    if extra.get("uid"):
        out["uid"] = extra["uid"]
    if extra.get("causes"):
        out["causes"] = extra["causes"]
    return out


def _not_found(resource: str, name: str) -> _ApiError:
    return _fail(404, "NotFound", f'{resource} "{name}" not found', _details(name, resource))


def _already_exists(resource: str, name: str) -> _ApiError:
    message = f'{resource} "{name}" already exists'
    return _fail(409, "AlreadyExists", message, _details(name, resource))


def _conflict(resource: str, name: str, why: str = OPTIMISTIC_LOCK_MESSAGE) -> _ApiError:
    message = f'Operation cannot be fulfilled on {resource} "{name}": {why}'
    return _fail(409, "Conflict", message, _details(name, resource))


def _forbidden(
    resource: str, name: str | None, why: str, causes: list[JSON] | None = None
) -> _ApiError:
    prefix = f'{resource} "{name}"' if name else resource
    details = _details(name, resource, causes=causes)
    return _fail(403, "Forbidden", f"{prefix} is forbidden: {why}", details)


def _bad_request(message: str) -> _ApiError:
    return _fail(400, "BadRequest", message)


def _generic_invalid() -> _ApiError:
    """NewGenericServerResponse(422): the patch error itself is dropped, details stay empty."""
    return _fail(422, "Invalid", GENERIC_INVALID_MESSAGE, {})


def _unsupported_media(accepted: Sequence[str]) -> _ApiError:
    message = "the body of the request was in an unknown format - accepted media types include: "
    return _fail(415, "UnsupportedMediaType", message + ", ".join(accepted))


def _method_not_allowed() -> _ApiError:
    message = "the server does not allow this method on the requested resource"
    return _fail(405, "MethodNotAllowed", message, {})


@dataclass(frozen=True)
class _FieldError:
    """field.Error: ``kind`` is the ErrorType ("Invalid value", "Required value", ...)."""

    kind: str
    field: str
    detail: str = ""
    value: Any = None

    _CAUSES: ClassVar[dict[str, str]] = {
        "Invalid value": "FieldValueInvalid",
        "Required value": "FieldValueRequired",
        "Forbidden": "FieldValueForbidden",
        "Too long": "FieldValueTooLong",
        "Unsupported value": "FieldValueNotSupported",
    }

    def body(self) -> str:
        text = self.kind
        if self.kind in ("Invalid value", "Unsupported value"):
            shown = _go_quote(self.value) if isinstance(self.value, str) else str(self.value)
            text += f": {shown}"
        if self.detail:
            text += f": {self.detail}"
        return text

    def text(self) -> str:
        return f"{self.field}: {self.body()}"

    def cause(self) -> JSON:
        return {"reason": self._CAUSES[self.kind], "message": self.body(), "field": self.field}


def _invalid(kind: str, name: str, errors: Sequence[_FieldError], *, group: str = "") -> _ApiError:
    """errors.NewInvalid: one error inline, several as an aggregate ``[a, b]``."""
    shown = f"{kind}.{group}" if group else kind
    if len(errors) == 1:
        message = f'{shown} "{name}" is invalid: {errors[0].text()}'
    else:
        message = f'{shown} "{name}" is invalid: [{", ".join(e.text() for e in errors)}]'
    details = _details(name, kind, group=group, causes=[e.cause() for e in errors])
    return _fail(422, "Invalid", message, details)


def _options_invalid(options_kind: str, errors: Sequence[_FieldError]) -> _ApiError:
    return _invalid(options_kind, "", errors, group="meta.k8s.io")


# --------------------------------------------------------------------------- validation helpers

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")

_MSG_DNS_LABEL = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_MSG_DNS_SUBDOMAIN = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_MSG_QUALIFIED_NAME = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
_MSG_LABEL_VALUE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
_MSG_CONFIG_KEY = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. "
    "'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is "
    "'[-._a-zA-Z0-9]+')"
)


def _dns_label_errors(value: str) -> list[str]:
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if not _DNS_LABEL.fullmatch(value):
        out.append(_MSG_DNS_LABEL)
    return out


def _dns_subdomain_errors(value: str) -> list[str]:
    out = []
    if len(value) > 253:
        out.append("must be no more than 253 characters")
    if not _DNS_SUBDOMAIN.fullmatch(value):
        out.append(_MSG_DNS_SUBDOMAIN)
    return out


def _qualified_name_errors(value: str) -> list[str]:
    """validation.IsQualifiedName: an optional DNS-subdomain prefix, then a 63-char name."""
    parts = value.split("/")
    if len(parts) > 2:
        return [
            "a qualified name "
            + _MSG_QUALIFIED_NAME
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    out: list[str] = []
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            out.append("prefix part must be non-empty")
        else:
            out.extend("prefix part " + msg for msg in _dns_subdomain_errors(prefix))
    if not name:
        out.append("name part must be non-empty")
    elif len(name) > 63:
        out.append("name part must be no more than 63 characters")
    if name and not _QUALIFIED_NAME.fullmatch(name):
        out.append("name part " + _MSG_QUALIFIED_NAME)
    return out


def _label_value_errors(value: str) -> list[str]:
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if not _LABEL_VALUE.fullmatch(value):
        out.append(_MSG_LABEL_VALUE)
    return out


def _config_key_errors(key: str) -> list[str]:
    out = []
    if len(key) > 253:
        out.append("must be no more than 253 characters")
    if not _CONFIG_KEY.fullmatch(key):
        out.append(_MSG_CONFIG_KEY)
    if key == ".":
        out.append("must not be '.'")
    elif key == "..":
        out.append("must not be '..'")
    elif key.startswith(".."):
        out.append("must not start with '..'")
    return out


_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _b64_error_index(text: str) -> int | None:
    """Where Go's base64.StdEncoding rejects ``text`` (CorruptInputError), or None."""
    n = len(text)
    for idx, ch in enumerate(text):
        if ch in _B64_ALPHABET:
            continue
        if ch != "=":
            return idx
        position = idx % 4
        if position < 2:
            return idx
        if position == 2:
            if idx + 1 >= n:
                return n
            if text[idx + 1] != "=":
                return idx
            return idx + 2 if idx + 2 < n else None
        return idx + 1 if idx + 1 < n else None
    if n % 4:
        return n - n % 4
    return None


def _go_json_error(raw: bytes) -> str | None:
    """Why Go's json.Unmarshal into map[string]interface{} rejects ``raw`` (None: accepted)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid character looking for beginning of value"

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=no_constants)
    except ValueError as exc:
        stripped = text.lstrip()
        if not stripped:
            return "unexpected end of JSON input"
        pos = getattr(exc, "pos", None)
        if not isinstance(pos, int):
            pos = len(text) - len(stripped)
        if pos >= len(text):
            return "unexpected end of JSON input"
        for literal in ("null", "true", "false"):
            if text[pos] == literal[0]:
                for offset, expected in enumerate(literal):
                    if pos + offset >= len(text):
                        return "unexpected end of JSON input"
                    if text[pos + offset] != expected:
                        return (
                            f"invalid character '{text[pos + offset]}' in literal {literal} "
                            f"(expecting '{expected}')"
                        )
        message = str(exc)
        if message.startswith("Extra data"):
            return f"invalid character '{text[pos]}' after top-level value"
        if message.startswith("Expecting property name"):
            return f"invalid character '{text[pos]}' looking for beginning of object key string"
        if message.startswith("Expecting ':'"):
            return f"invalid character '{text[pos]}' after object key"
        if message.startswith("Expecting ','"):
            return f"invalid character '{text[pos]}' after object key:value pair"
        return f"invalid character '{text[pos]}' looking for beginning of value"
    if value is None or isinstance(value, dict):
        return None
    kind = {list: "array", str: "string", bool: "bool"}.get(type(value), "number")
    return f"json: cannot unmarshal {kind} into Go value of type map[string]interface {{}}"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _DecodeError(Exception):
    """The body cannot become the Go type: 400 ``<Kind> in version "v1" cannot be handled``."""


def _decode(value: Any, schema: Any, path: str, unknown: list[str], owner: str) -> Any:
    """Check ``value`` against ``schema``; drop unknown fields (recording their paths) and nulls."""
    if schema == _ANY:
        return copy.deepcopy(value)
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise _DecodeError(
                f"json: cannot unmarshal {_json_type(value)} into Go struct field "
                f"{owner}.{path} of type struct"
            )
        out: JSON = {}
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if key not in schema:
                unknown.append(child)
                continue
            if item is None:
                continue
            out[key] = _decode(item, schema[key], child, unknown, owner)
        return out
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise _DecodeError(
                f"json: cannot unmarshal {_json_type(value)} into Go struct field "
                f"{owner}.{path} of type array"
            )
        return [
            _decode(item, schema[0], f"{path}[{i}]", unknown, owner)
            for i, item in enumerate(value)
            if item is not None
        ]
    expected = {
        _STR: str,
        _TIME: str,
        _BOOL: bool,
        _INT: int,
        _STRMAP: dict,
        _BYTESMAP: dict,
    }[schema]
    if isinstance(value, datetime) and schema == _TIME:
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise _DecodeError(
            f"json: cannot unmarshal {_json_type(value)} into Go struct field "
            f"{owner}.{path} of type {schema}"
        )
    if schema in (_STRMAP, _BYTESMAP):
        out_map: dict[str, str] = {}
        for key, item in value.items():
            if item is None:
                item = ""
            if not isinstance(item, str):
                gotype = "[]uint8" if schema == _BYTESMAP else "string"
                raise _DecodeError(
                    f"json: cannot unmarshal {_json_type(item)} into Go struct field "
                    f"{owner}.{path} of type {gotype}"
                )
            if schema == _BYTESMAP:
                compact = item.replace("\r", "").replace("\n", "")
                bad = _b64_error_index(compact)
                if bad is not None:
                    raise _DecodeError(f"illegal base64 data at input byte {bad}")
                item = base64.b64encode(base64.b64decode(compact)).decode("ascii")
            out_map[str(key)] = item
        return out_map
    return value


def _omit_empty(value: Any, schema: Any) -> Any:
    """Go's omitempty on the stored object: "", {}, [] fields disappear (map values stay)."""
    if isinstance(schema, dict) and isinstance(value, dict):
        out: JSON = {}
        for key, item in value.items():
            sub = schema.get(key, _ANY)
            cleaned = _omit_empty(item, sub)
            if cleaned in ("", {}, []) and sub != _BOOL:
                continue
            out[key] = cleaned
        return out
    if isinstance(schema, list) and isinstance(value, list):
        return [_omit_empty(item, schema[0]) for item in value]
    return value


def _ordered(value: Any, schema: Any) -> Any:
    """Fields in Go struct order, map keys sorted (what the real server writes)."""
    if isinstance(schema, dict) and isinstance(value, dict):
        out: JSON = {key: _ordered(value[key], schema[key]) for key in schema if key in value}
        for key in value:
            if key not in out:
                out[key] = value[key]
        return out
    if isinstance(schema, list) and isinstance(value, list):
        return [_ordered(item, schema[0]) for item in value]
    if schema in (_STRMAP, _BYTESMAP) and isinstance(value, dict):
        return {key: value[key] for key in sorted(value)}
    return value


# --------------------------------------------------------------------------- patches


class _PatchError(Exception):
    """A patch that cannot apply (JSON patch: answered 422 with the generic message)."""


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise _PatchError("path must be a string")
    if path == "":
        return []
    if not path.startswith("/"):
        raise _PatchError(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(token: str, size: int, *, allow_end: bool) -> int:
    if allow_end and token == "-":
        return size
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise _PatchError(f"invalid array index {token!r}")
    index = int(token)
    if index > size or (index == size and not allow_end):
        raise _PatchError(f"array index {index} out of bounds")
    return index


def _parent(doc: list[Any], parts: list[str]) -> tuple[Any, str]:
    """The container holding the last part (``doc`` is ``[root]``, so "" is reachable)."""
    node: Any = doc
    for part in ["0", *parts[:-1]] if parts else []:
        if isinstance(node, dict):
            if part not in node:
                raise _PatchError("doc is missing path")
            node = node[part]
        elif isinstance(node, list):
            idx = _index(part, len(node), allow_end=False)
            node = node[idx]
        else:
            raise _PatchError("doc is missing path")
    return (node, parts[-1]) if parts else (doc, "0")


def _get(doc: list[Any], parts: list[str]) -> Any:
    container, key = _parent(doc, parts)
    if isinstance(container, dict):
        if key not in container:
            raise _PatchError("doc is missing key")
        return container[key]
    if isinstance(container, list):
        return container[_index(key, len(container), allow_end=False)]
    raise _PatchError("doc is missing path")


def _add(doc: list[Any], parts: list[str], value: Any) -> None:
    container, key = _parent(doc, parts)
    if isinstance(container, dict):
        container[key] = value
    elif isinstance(container, list):
        if container is doc:
            doc[0] = value
        else:
            container.insert(_index(key, len(container), allow_end=True), value)
    else:
        raise _PatchError("add operation does not apply: doc is missing path")


def _remove(doc: list[Any], parts: list[str]) -> Any:
    container, key = _parent(doc, parts)
    if isinstance(container, dict):
        if key not in container:
            raise _PatchError("remove operation does not apply: doc is missing key")
        return container.pop(key)
    if isinstance(container, list) and container is not doc:
        return container.pop(_index(key, len(container), allow_end=False))
    raise _PatchError("remove operation does not apply: doc is missing path")


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: unlike Python's, true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def apply_json_patch(target: JSON, operations: list[Any]) -> Any:
    """RFC 6902 as evanphx/json-patch (the apiserver's) applies it; raises _PatchError."""
    doc: list[Any] = [copy.deepcopy(target)]
    for op in operations:
        if not isinstance(op, dict):
            raise _PatchError("operation must be an object")
        kind = op.get("op")
        parts = _pointer(op.get("path"))
        if kind == "add":
            if "value" not in op:
                raise _PatchError("add operation has no value")
            _add(doc, parts, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "replace":
            if "value" not in op:
                raise _PatchError("replace operation has no value")
            container, key = _parent(doc, parts)
            if isinstance(container, dict):
                if key not in container:
                    raise _PatchError("replace operation does not apply: doc is missing key")
                container[key] = copy.deepcopy(op["value"])
            elif isinstance(container, list):
                slot = 0 if container is doc else _index(key, len(container), allow_end=False)
                container[slot] = copy.deepcopy(op["value"])
            else:
                raise _PatchError("replace operation does not apply: doc is missing path")
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_get(doc, source))
            _add(doc, parts, value)
        elif kind == "test":
            try:
                current = _get(doc, parts)
            except _PatchError:
                if op.get("value") is None:
                    continue  # evanphx: a missing path equals null
                raise _PatchError("test operation does not apply: is missing path") from None
            if not _json_equal(current, op.get("value")):
                raise _PatchError(f"testing value {op.get('path')} failed: test failed")
        else:
            raise _PatchError(f"Unexpected kind: {kind}")
    return doc[0]


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null removes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


_DELETE = object()


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_directives(v)
            for k, v in value.items()
            if not k.startswith("$") and v is not None
        }
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _smp_map(original: Any, patch: JSON, path: str, lists: Mapping[str, str]) -> Any:
    """Strategic merge of one map; returns _DELETE for ``$patch: delete``."""
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return _strip_directives(patch)
    if directive is not None:
        raise _PatchError(f"Unknown patch type: {directive}")
    out: JSON = copy.deepcopy(original) if isinstance(original, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(out.get(name), list) and isinstance(value, list):
                out[name] = [v for v in out[name] if v not in value]
            continue
        if key.startswith("$"):
            continue  # $setElementOrder/…, $retainKeys: order and retention are not modelled
        child = f"{path}.{key}" if path else key
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            merged = _smp_map(out.get(key), value, child, lists)
            if merged is _DELETE:
                out.pop(key, None)
            else:
                out[key] = merged
        elif isinstance(value, list) and child in lists:
            existing = out.get(key)
            original_list = existing if isinstance(existing, list) else []
            out[key] = _smp_list(original_list, value, lists[child], child, lists)
        else:
            out[key] = _strip_directives(value)
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain or k in patch}
    return out


def _smp_list(
    original: list[Any], patch: list[Any], merge_key: str, path: str, lists: Mapping[str, str]
) -> list[Any]:
    if merge_key == "":
        merged = list(original)
        merged.extend(v for v in patch if v not in merged)
        return merged
    if any(isinstance(v, dict) and v.get("$patch") == "replace" for v in patch):
        return [
            _strip_directives(v)
            for v in patch
            if not (isinstance(v, dict) and v.get("$patch") == "replace")
        ]
    out = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise _PatchError(f"map: {item} does not contain declared merge key: {merge_key}")
        found = next(
            (
                i
                for i, v in enumerate(out)
                if isinstance(v, dict) and v.get(merge_key) == item[merge_key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if found is not None:
                out.pop(found)
            continue
        if found is None:
            out.append(_strip_directives(item))
        else:
            out[found] = _smp_map(out[found], item, path, lists)
    return out


def apply_strategic_merge_patch(target: JSON, patch: JSON, kind: str) -> JSON:
    """A strategic merge patch with the kind's list strategies (atomic unless declared)."""
    result = _smp_map(target, patch, "", _kind_of(kind).merge_lists)
    if result is _DELETE:
        raise _PatchError("the whole object cannot be deleted by a patch")
    assert isinstance(result, dict)
    return result


# --------------------------------------------------------------------------- selectors


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!", ">", "<"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key, "")
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if not present or not re.fullmatch(r"-?\d+", value):
            return False
        bound = int(self.values[0])
        return int(value) > bound if self.op == ">" else int(value) < bound


_SELECTOR_TOKEN = re.compile(r"\s*(!=|==|=|!|\(|\)|,|>|<|[^\s!=(),<>]+)")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        match = _SELECTOR_TOKEN.match(text, pos)
        if match is None:
            break
        out.append(match.group(1))
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse_label_selector(text: str) -> list[_Requirement]:
    """labels.Parse: =, ==, !=, in (...), notin (...), key, !key, >, <; comma is AND."""
    tokens = _tokens(text)
    reqs: list[_Requirement] = []
    pos = 0
    ops = {"=", "==", "!=", "!", "(", ")", ",", ">", "<"}

    def take() -> str | None:
        nonlocal pos
        if pos >= len(tokens):
            return None
        pos += 1
        return tokens[pos - 1]

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    while pos < len(tokens):
        token = take()
        if token == "!":
            key = take()
            if key is None or key in ops:
                raise ValueError(f"found '{key or ''}', expected: identifier")
            reqs.append(_Requirement(key, "!"))
        else:
            if token is None or token in ops:
                raise ValueError(f"found '{token}', expected: !, identifier, or 'end of string'")
            key = token
            following = peek()
            if following is None or following == ",":
                reqs.append(_Requirement(key, "exists"))
            elif following in ("=", "==", "!="):
                take()
                value = peek()
                if value is None or value == ",":
                    value = ""
                elif value in ops:
                    raise ValueError(f"found '{value}', expected: identifier")
                else:
                    take()
                reqs.append(_Requirement(key, "!=" if following == "!=" else "=", (value,)))
            elif following in ("in", "notin"):
                take()
                if take() != "(":
                    raise ValueError("found '', expected: '('")
                values: list[str] = []
                while True:
                    item = take()
                    if item is None:
                        raise ValueError("found 'end of string', expected: ')'")
                    if item == ")":
                        break
                    if item == ",":
                        continue
                    if item in ops:
                        raise ValueError(f"found '{item}', expected: ',', ')' or identifier")
                    values.append(item)
                if not values:
                    raise ValueError("for 'in', 'notin' operators, values set can't be empty")
                reqs.append(_Requirement(key, following, tuple(values)))
            elif following in (">", "<"):
                take()
                value = take() or ""
                if not re.fullmatch(r"-?\d+", value):
                    raise ValueError(
                        f"for 'Gt', 'Lt' operators, the value must be an integer: {value!r}"
                    )
                reqs.append(_Requirement(key, following, (value,)))
            else:
                raise ValueError(f"found '{following}', expected: in, notin, =, ==, !=, gt, lt")
        nxt = take()
        if nxt not in (None, ","):
            raise ValueError(f"found '{nxt}', expected: ',' or 'end of string'")
        if nxt == "," and pos >= len(tokens):
            # labels.Parse wants another requirement after every comma.
            raise ValueError("found '', expected: identifier after ','")
    for req in reqs:
        problems = _qualified_name_errors(req.key)
        if problems:
            raise ValueError(f"key: Invalid value: {_go_quote(req.key)}: {'; '.join(problems)}")
        if req.op not in (">", "<"):
            for value in req.values:
                problems = _label_value_errors(value)
                if problems:
                    raise ValueError(
                        f"values[0][{req.key}]: Invalid value: {_go_quote(value)}: "
                        + "; ".join(problems)
                    )
    return reqs


def _parse_field_selector(text: str, kind: _Kind) -> list[tuple[str, bool, str]]:
    """fields.ParseSelector for ``k=v``, ``k==v``, ``k!=v``; comma is AND."""
    out: list[tuple[str, bool, str]] = []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        match = re.fullmatch(r"([^=!]+)(!=|==|=)(.*)", term)
        if match is None:
            raise ValueError(f"invalid selector: '{text}'; can't understand '{term}'")
        key, op, value = match.group(1).strip(), match.group(2), match.group(3).strip()
        if key not in kind.field_selectors:
            raise ValueError(f"field label not supported: {key}")
        out.append((key, op != "!=", value))
    return out


def _field_value(obj: JSON, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, str) else ""


# --------------------------------------------------------------------------- HTTP plumbing


class _RequestHandler(EmulatorRequestHandler):
    max_request_bytes = MAX_REQUEST_BYTES
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10.0)
            self.request.do_handshake()  # in this worker thread, not the accept loop
        super().setup()

    def _serve(self) -> None:
        try:
            body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        if body is None:
            message = f"Request entity too large: limit is {MAX_REQUEST_BYTES}"
            reply: _Reply | None = _json_reply(
                413, _status_body(413, "RequestEntityTooLarge", message)
            )
            self.close_connection = True
        else:
            reply = self.server.emulator._handle(self.command, self.path, self.headers, body)
        if reply is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(reply.status)
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        for name, value in reply.headers:
            self.send_header(name, value)
        payload = reply.body if self.command != "HEAD" else None
        if reply.body is not None and reply.content_type is not None:
            self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(payload or b"")))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve


class _Server(EmulatorServer):
    def __init__(self, emulator: K8sEmulator, tls: ssl.SSLContext | None) -> None:
        self.emulator = emulator
        self.tls = tls
        super().__init__(_RequestHandler, emulator._server_errors, "k8s-emulator-conn")

    def get_request(self) -> tuple[Any, Any]:
        conn, address = super().get_request()
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, address


# --------------------------------------------------------------------------- one request


@dataclass
class _Call:
    """A resolved API request."""

    method: str
    kind: _Kind
    namespace: str | None  # None: cluster scope (namespaces, or a list across namespaces)
    name: str | None
    query: dict[str, list[str]]
    content_type: str | None  # without parameters, lower-cased
    body: bytes
    verb: Verb
    warnings: list[str] = field(default_factory=list)

    def param(self, key: str) -> str | None:
        values = self.query.get(key)
        return values[-1] if values else None

    @property
    def dry_run(self) -> bool:
        return bool(self.query.get("dryRun"))


# --------------------------------------------------------------------------- the emulator


class K8sEmulator(ServedEmulator):
    """A Kubernetes API server (core/v1 namespaces, secrets, serviceaccounts) in this process.

    ``token``: the bearer token every API request must carry (a random one when
    None; ``auth=False`` accepts any request). ``user``: the identity named in
    403 answers. ``default_sa_delay``: seconds between a namespace's creation
    and its ``default`` service account (0: at the next request).
    ``termination_delay``: seconds a deleted namespace stays Terminating.
    ``tls_directory``: serve HTTPS with a fresh test CA written there (needed
    only for the in-cluster configuration, which insists on https).
    """

    _thread_name = "k8s-emulator"

    def __init__(
        self,
        *,
        token: str | None = None,
        auth: bool = True,
        user: str = DEFAULT_USER,
        default_sa_delay: float = 0.5,
        termination_delay: float = 0.5,
        tls_directory: Path | None = None,
        namespaces: Iterable[str] = BUILTIN_NAMESPACES,
    ) -> None:
        self.token: str | None = (token or "k8s-emu-" + secrets.token_hex(16)) if auth else None
        self.user = user
        self.default_sa_delay = default_sa_delay
        self.termination_delay = termination_delay
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._rv = 0
        self._store: dict[str, dict[tuple[str, str], JSON]] = {k: {} for k in _KINDS}
        self._pending_sa: dict[str, float] = {}
        self._terminating: dict[str, float] = {}
        self._forbidden: list[_ForbidRule] = []
        self._faults: list[InjectedFault] = []
        self._hooks: list[_Hook] = []
        self._log: deque[RequestRecord] = deque(maxlen=MAX_LOG_RECORDS)
        self._server_errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._tls: ssl.SSLContext | None = None
        self.ca_file: Path | None = None
        if tls_directory is not None:
            self._setup_tls(tls_directory)
        for name in namespaces:
            self.create_namespace(name)

    def _setup_tls(self, directory: Path) -> None:
        authority = CertificateAuthority("k8s-emulator", directory)
        issued = authority.server("k8s-emulator-server")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        self._tls = context
        self.ca_file = authority.cert

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("K8sEmulator not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` with TLS), after start()."""
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _make_server(self) -> EmulatorServer:
        return _Server(self, self._tls)

    # ------------------------------------------------------------------ client configuration

    def write_kubeconfig(
        self,
        path: Path,
        *,
        context_name: str = "k8s-emulator",
        namespace: str | None = None,
        token: str | None = None,
        merge: bool = False,
    ) -> Path:
        """Write a kubeconfig (mode 0600) whose context ``context_name`` reaches this emulator.

        The user authenticates with ``token`` (default: the emulator's). With
        ``merge`` an existing file keeps its other clusters, users and
        contexts (same names are replaced) and its current-context.
        """
        cluster: JSON = {"server": self.url}
        if self.ca_file is not None:
            cluster["certificate-authority"] = str(self.ca_file)
        user_token = token if token is not None else self.token
        user: JSON = {"token": user_token} if user_token else {}
        context: JSON = {"cluster": context_name, "user": context_name}
        if namespace:
            context["namespace"] = namespace
        config: JSON = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [],
            "users": [],
            "contexts": [],
            "current-context": context_name,
        }
        if merge and path.exists():
            loaded = yaml.safe_load(path.read_text()) or {}
            if isinstance(loaded, dict):
                config.update(loaded)
                config["current-context"] = loaded.get("current-context") or context_name
        for section, entry in (
            ("clusters", {"name": context_name, "cluster": cluster}),
            ("users", {"name": context_name, "user": user}),
            ("contexts", {"name": context_name, "context": context}),
        ):
            kept = [e for e in config.get(section) or [] if e.get("name") != context_name]
            config[section] = [*kept, entry]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        return path

    def in_cluster_files(self, directory: Path) -> InClusterFiles:
        """A token file and CA file for InClusterConfigLoader (TLS emulators only)."""
        if self.ca_file is None:
            raise RuntimeError("in-cluster configuration needs K8sEmulator(tls_directory=...)")
        directory.mkdir(parents=True, exist_ok=True)
        token_file = directory / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.token or "anonymous")
        ca_file = directory / "ca.crt"
        ca_file.write_bytes(self.ca_file.read_bytes())
        return InClusterFiles("127.0.0.1", self.port, token_file, ca_file)

    # ------------------------------------------------------------------ store primitives

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    @property
    def resource_version(self) -> str:
        """The newest resourceVersion handed out (a global counter, as the real server's)."""
        with self._lock:
            return str(self._rv)

    @staticmethod
    def _key(kind: _Kind, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "") if kind.namespaced else "", name)

    def _stored(self, kind: _Kind, namespace: str | None, name: str) -> JSON | None:
        return self._store[kind.resource].get(self._key(kind, namespace, name))

    def _write(self, kind: _Kind, obj: JSON) -> JSON:
        """Store ``obj`` with a new resourceVersion (the caller holds the lock)."""
        obj["metadata"]["resourceVersion"] = self._next_rv()
        meta = obj["metadata"]
        self._store[kind.resource][self._key(kind, meta.get("namespace"), meta["name"])] = obj
        return obj

    def _new_meta(self, name: str, namespace: str | None) -> JSON:
        meta: JSON = {"name": name}
        if namespace:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _timestamp()
        return meta

    # ------------------------------------------------------------------ controllers (lazy)

    def _tick(self) -> None:
        """Run controller work whose time has come: default service accounts, purges."""
        now = time.monotonic()
        with self._lock:
            for ns, due in list(self._pending_sa.items()):
                if due <= now:
                    del self._pending_sa[ns]
                    self._ensure_default_sa(ns)
            for ns, due in list(self._terminating.items()):
                if due <= now:
                    del self._terminating[ns]
                    self._purge_namespace(ns)

    def _ensure_default_sa(self, ns: str) -> None:
        namespace = self._stored(NAMESPACES, None, ns)
        if namespace is None or namespace["status"].get("phase") != "Active":
            return
        if self._stored(SERVICE_ACCOUNTS, ns, "default") is None:
            sa = {
                "kind": "ServiceAccount",
                "apiVersion": "v1",
                "metadata": self._new_meta("default", ns),
            }
            self._write(SERVICE_ACCOUNTS, sa)

    def _purge_namespace(self, ns: str) -> None:
        for kind in (SECRETS, SERVICE_ACCOUNTS):
            for key in [k for k in self._store[kind.resource] if k[0] == ns]:
                del self._store[kind.resource][key]
        self._store[NAMESPACES.resource].pop(("", ns), None)
        self._pending_sa.pop(ns, None)
        self._next_rv()  # the deletion is a write too

    def _schedule_default_sa(self, ns: str, delay: float) -> None:
        self._pending_sa[ns] = time.monotonic() + max(0.0, delay)

    def settle(self) -> None:
        """Do all pending controller work now (default service accounts, namespace purges)."""
        with self._lock:
            for ns in self._pending_sa:
                self._pending_sa[ns] = 0.0
            for ns in self._terminating:
                self._terminating[ns] = 0.0
        self._tick()

    # ------------------------------------------------------------------ direct access (controls)

    def create_namespace(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        default_service_account: DefaultServiceAccount = "now",
    ) -> JSON:
        """Create an Active namespace directly (no API, no checks); returns a copy.

        ``default_service_account``: "now" creates it at once, "delayed" after
        ``default_sa_delay`` like the API path, "never" not at all.
        """
        with self._lock:
            if self._stored(NAMESPACES, None, name) is not None:
                raise ValueError(f"namespace {name!r} already exists")
            meta = self._new_meta(name, None)
            meta["labels"] = {**(labels or {}), NAMESPACE_NAME_LABEL: name}
            if annotations:
                meta["annotations"] = dict(annotations)
            obj: JSON = {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": meta,
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }
            self._write(NAMESPACES, obj)
            if default_service_account == "now":
                self._ensure_default_sa(name)
            elif default_service_account == "delayed":
                self._schedule_default_sa(name, self.default_sa_delay)
            return copy.deepcopy(obj)

    def get_object(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        """A copy of the stored object (with kind/apiVersion), or None."""
        self._tick()
        k = _kind_of(kind)
        self._check_scope(k, namespace)
        with self._lock:
            found = self._stored(k, namespace, name)
            return None if found is None else copy.deepcopy(found)

    def list_objects(self, kind: str, namespace: str | None = None) -> list[JSON]:
        """Copies of the stored objects of a kind (in one namespace or all), in key order."""
        self._tick()
        k = _kind_of(kind)
        with self._lock:
            items = sorted(self._store[k.resource].items())
            return [
                copy.deepcopy(obj)
                for (ns, _name), obj in items
                if namespace is None or not k.namespaced or ns == namespace
            ]

    def put_object(self, kind: str, namespace: str | None, obj: Mapping[str, Any]) -> JSON:
        """Store ``obj`` bypassing the API (no validation, no admission): another writer.

        kind/apiVersion/namespace are filled in, uid and creationTimestamp kept
        from the stored object or made up; the object gets a new
        resourceVersion. Returns a copy of what is stored.
        """
        self._tick()
        k = _kind_of(kind)
        self._check_scope(k, namespace)
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("put_object needs metadata.name")
        with self._lock:
            old = self._stored(k, namespace, meta["name"])
            base = self._new_meta(meta["name"], namespace if k.namespaced else None)
            if old is not None:
                base["uid"] = old["metadata"]["uid"]
                base["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            for key, value in base.items():
                meta.setdefault(key, value)
            if k.namespaced:
                meta["namespace"] = namespace
            new["kind"], new["apiVersion"] = k.kind, "v1"
            if k is NAMESPACES:
                new.setdefault("status", {"phase": "Active"})
            stored = self._write(k, _ordered(new, k.schema))
            return copy.deepcopy(stored)

    def mutate_object(
        self, kind: str, namespace: str | None, name: str, change: Callable[[JSON], None]
    ) -> JSON:
        """Another writer: ``change`` edits a copy in place, stored with a new resourceVersion."""
        current = self.get_object(kind, namespace, name)
        if current is None:
            raise KeyError(f"{kind} {namespace}/{name} does not exist")
        change(current)
        return self.put_object(kind, namespace, current)

    def bump_resource_version(self, kind: str, namespace: str | None, name: str) -> str:
        """Rewrite the object unchanged so that every resourceVersion a client holds is stale."""
        return str(
            self.mutate_object(kind, namespace, name, lambda _obj: None)["metadata"][
                "resourceVersion"
            ]
        )

    def delete_object(self, kind: str, namespace: str | None, name: str) -> bool:
        """Remove an object at once (a namespace with its contents, no Terminating phase)."""
        self._tick()
        k = _kind_of(kind)
        self._check_scope(k, namespace)
        with self._lock:
            if self._stored(k, namespace, name) is None:
                return False
            if k is NAMESPACES:
                self._terminating.pop(name, None)
                self._purge_namespace(name)
            else:
                del self._store[k.resource][self._key(k, namespace, name)]
                self._next_rv()
            return True

    @staticmethod
    def _check_scope(kind: _Kind, namespace: str | None) -> None:
        if kind.namespaced and not namespace:
            raise ValueError(f"{kind.resource} are namespaced: give a namespace")
        if not kind.namespaced and namespace:
            raise ValueError(f"{kind.resource} are cluster-scoped: namespace must be None")

    # ------------------------------------------------------------------ authorization controls

    def forbid_namespace(
        self,
        namespace: str,
        *,
        verbs: Iterable[str] | None = None,
        resources: Iterable[str] | None = None,
    ) -> None:
        """Answer 403 (RBAC wording) to requests into ``namespace`` (None: every verb/resource).

        Requests on the namespace object itself (GET/PUT/PATCH/DELETE
        ``/api/v1/namespaces/{ns}``) count as in the namespace, as RBAC sees them.
        """
        self._add_rule(namespace, verbs, resources)

    def forbid_cluster_scope(
        self, *, verbs: Iterable[str] | None = None, resources: Iterable[str] | None = None
    ) -> None:
        """Answer 403 to cluster-scoped requests (list/create namespaces, cross-namespace lists)."""
        self._add_rule(None, verbs, resources)

    def _add_rule(
        self, namespace: str | None, verbs: Iterable[str] | None, resources: Iterable[str] | None
    ) -> None:
        if verbs is not None:
            verbs = list(verbs)
            unknown = set(verbs) - _VERBS
            if unknown:
                raise ValueError(f"unknown verbs {sorted(unknown)}: use {sorted(_VERBS)}")
        rule = _ForbidRule(
            namespace,
            frozenset(_kind_of(r).resource for r in resources) if resources is not None else None,
            frozenset(verbs) if verbs is not None else None,
        )
        with self._lock:
            self._forbidden.append(rule)

    def clear_forbidden(self) -> None:
        with self._lock:
            self._forbidden.clear()

    # ------------------------------------------------------------------ faults & hooks

    def inject(
        self,
        *,
        path_regex: str | None = None,
        method: str | None = None,
        status: int | None = None,
        delay: float = 0.0,
        drop: bool = False,
        count: int | None = None,
        message: str | None = None,
        retry_after: int | None = None,
    ) -> InjectedFault:
        """Arm a fault for requests whose URL path matches ``path_regex`` (re.search).

        - ``delay``: sleep that many seconds first (then answer normally, unless
          ``status`` or ``drop`` is given too);
        - ``status``: answer a Status with that code instead (``retry_after``
          adds a Retry-After header and details.retryAfterSeconds);
        - ``drop``: close the connection without any response.
        ``count`` limits how many requests it hits (None: until clear_faults()).
        The first armed fault that matches applies. Note that urllib3 (under
        the kubernetes client) retries a dropped idempotent request by itself.
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
            message=message,
            retry_after=retry_after,
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

    @staticmethod
    def _fault_reply(fault: InjectedFault) -> _Reply:
        code = fault.status or 500
        reasons = {
            429: ("TooManyRequests", "Too many requests, please try again later."),
            500: ("InternalError", "Internal error occurred: injected fault"),
            503: ("ServiceUnavailable", "The server is currently unable to handle the request"),
            504: ("Timeout", "The server was unable to return a response in the time allotted"),
        }
        reason, text = reasons.get(code, ("", f"injected fault: HTTP {code}"))
        details: JSON | None = None
        headers: list[tuple[str, str]] = []
        if fault.retry_after is not None:
            details = {"retryAfterSeconds": fault.retry_after}
            headers.append(("Retry-After", str(fault.retry_after)))
        body = _status_body(code, reason, fault.message or text, details)
        return _json_reply(code, body, headers)

    def before_write(
        self,
        fn: Callable[[], None],
        *,
        kind: str | None = None,
        namespace: str | None = None,
        name: str | None = None,
        count: int = 1,
    ) -> None:
        """Run ``fn`` when the next matching write (POST/PUT/PATCH/DELETE) arrives, before it runs.

        This is the window between a client's GET and its write: ``fn`` may
        call mutate_object()/bump_resource_version() so the write meets a
        newer object (409 for a read-modify-PUT, failing ``test`` for a JSON
        patch, silent loss of the other entry for a strategic merge patch).
        """
        hook = _Hook(
            fn,
            _kind_of(kind).resource if kind is not None else None,
            namespace,
            name,
            count,
        )
        with self._lock:
            self._hooks.append(hook)

    def _run_hooks(self, call: _Call) -> None:
        due: list[_Hook] = []
        with self._lock:
            for hook in list(self._hooks):
                if hook.matches(call.kind.resource, call.namespace, call.name):
                    due.append(hook)
                    hook.remaining -= 1
                    if hook.remaining <= 0:
                        self._hooks.remove(hook)
        for hook in due:
            hook.fn()

    # ------------------------------------------------------------------ request log

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request so far (the newest MAX_LOG_RECORDS), oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ================================================================== HTTP handling

    def _handle(self, method: str, target: str, headers: Message, body: bytes) -> _Reply | None:
        """One HTTP request -> a reply, or None to drop the connection."""
        split = urlsplit(target)
        status: int | None = None
        try:
            fault = self._take_fault(method, split.path)
            reply: _Reply | None
            if fault is not None and fault.delay > 0 and self._stopping.wait(fault.delay):
                reply = None  # shutting down: give up on the request
            elif fault is not None and fault.drop:
                reply = None
            elif fault is not None and fault.status is not None:
                reply = self._fault_reply(fault)
            else:
                try:
                    reply = self._dispatch(method, split.path, split.query, headers, body)
                except _ApiError as exc:
                    reply = exc.reply
                except Exception:  # noqa: BLE001 - any emulator bug becomes a visible 500
                    self._server_errors.append(traceback.format_exc())
                    reply = _json_reply(
                        500, _status_body(500, "InternalError", "emulator bug, see server_errors")
                    )
            status = None if reply is None else reply.status
            return reply
        finally:
            record = RequestRecord(
                method=method,
                path=split.path,
                query=split.query,
                content_type=headers.get("Content-Type"),
                body=body,
                token_present=bool(headers.get("Authorization")),
                status=status,
            )
            with self._lock:
                self._log.append(record)

    def _authenticate(self, headers: Message) -> None:
        if self.token is None:
            return
        scheme, _, value = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or value.strip() != self.token:
            raise _fail(401, "Unauthorized", "Unauthorized")

    def _dispatch(
        self, method: str, path: str, query_text: str, headers: Message, body: bytes
    ) -> _Reply:
        self._tick()
        if path in ("/healthz", "/livez", "/readyz"):
            return _Reply(200, b"ok", "text/plain; charset=utf-8")
        if path in ("/version", "/version/"):
            return _json_reply(200, self._version_info())
        self._authenticate(headers)
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        query = parse_qs(query_text, keep_blank_values=True)
        raw_type = headers.get("Content-Type")
        content_type = raw_type.split(";")[0].strip().lower() if raw_type else None
        match parts:
            case ["api"]:
                return self._discovery(method, self._api_versions())
            case ["api", "v1"]:
                return self._discovery(method, self._api_resources())
            case ["apis"]:
                return self._discovery(
                    method, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
                )
            case ["api", "v1", "namespaces"]:
                kind, namespace, name = NAMESPACES, None, None
            case ["api", "v1", "namespaces", ns]:
                kind, namespace, name = NAMESPACES, None, ns
            case ["api", "v1", "namespaces", ns, resource] if resource in (
                "secrets",
                "serviceaccounts",
            ):
                kind, namespace, name = _KINDS[resource], ns, None
            case ["api", "v1", "namespaces", ns, resource, obj_name] if resource in (
                "secrets",
                "serviceaccounts",
            ):
                kind, namespace, name = _KINDS[resource], ns, obj_name
            case ["api", "v1", resource] if resource in ("secrets", "serviceaccounts"):
                if method != "GET":
                    raise _method_not_allowed()
                kind, namespace, name = _KINDS[resource], None, None
            case _:
                return _Reply(404, b"404 page not found\n", "text/plain; charset=utf-8")
        verb = self._verb(method, name, query, collection_ok=kind is not NAMESPACES)
        call = _Call(method, kind, namespace, name, query, content_type, body, verb)
        self._authorize(call)
        if verb in ("create", "update", "patch", "delete", "deletecollection"):
            self._run_hooks(call)
        with self._lock:
            reply = self._perform(call)
        for warning in call.warnings:
            reply.headers.append(("Warning", f"299 - {_go_quote(warning)}"))
        return reply

    @staticmethod
    def _verb(
        method: str, name: str | None, query: dict[str, list[str]], *, collection_ok: bool
    ) -> Verb:
        watch = query.get("watch", ["false"])[-1] in ("true", "1")
        if method == "GET":
            if name is not None:
                return "get"
            return "watch" if watch else "list"
        if method == "POST" and name is None:
            return "create"
        if method == "PUT" and name is not None:
            return "update"
        if method == "PATCH" and name is not None:
            return "patch"
        if method == "DELETE":
            if name is not None:
                return "delete"
            if collection_ok:
                return "deletecollection"
        raise _method_not_allowed()

    def _authorize(self, call: _Call) -> None:
        # RBAC sees a request on a namespace object as a request in that namespace.
        scope = call.name if call.kind is NAMESPACES else call.namespace
        with self._lock:
            rules = list(self._forbidden)
        for rule in rules:
            if rule.matches(scope, call.kind.resource, call.verb):
                where = f'in the namespace "{scope}"' if scope else "at the cluster scope"
                why = (
                    f'User "{self.user}" cannot {call.verb} resource "{call.kind.resource}" '
                    f'in API group "" {where}'
                )
                raise _forbidden(call.kind.resource, call.name, why)

    def _version_info(self) -> JSON:
        return {
            "major": "1",
            "minor": KUBERNETES_VERSION.split(".")[1],
            "emulationMajor": "1",
            "emulationMinor": KUBERNETES_VERSION.split(".")[1],
            "gitVersion": KUBERNETES_VERSION,
            "gitCommit": "0" * 40,
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.25.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    @staticmethod
    def _discovery(method: str, body: JSON) -> _Reply:
        if method != "GET":
            raise _method_not_allowed()
        return _json_reply(200, body)

    def _api_versions(self) -> JSON:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}
            ],
        }

    @staticmethod
    def _api_resources() -> JSON:
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        resources = []
        for kind, short in ((NAMESPACES, "ns"), (SECRETS, None), (SERVICE_ACCOUNTS, "sa")):
            entry: JSON = {
                "name": kind.resource,
                "singularName": kind.kind.lower(),
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": [v for v in verbs if kind.namespaced or v != "deletecollection"],
            }
            if short:
                entry["shortNames"] = [short]
            resources.append(entry)
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources}

    # ------------------------------------------------------------------ operations

    def _perform(self, call: _Call) -> _Reply:
        match call.verb:
            case "get":
                assert call.name is not None
                found = self._stored(call.kind, call.namespace, call.name)
                if found is None:
                    raise _not_found(call.kind.resource, call.name)
                return _json_reply(200, self._render(call.kind, found))
            case "list":
                return self._list(call)
            case "watch":
                raise _bad_request("the Kubernetes emulator does not support watch")
            case "create":
                return self._create(call)
            case "update":
                return self._update(call)
            case "patch":
                return self._patch(call)
            case "delete":
                return self._delete(call)
            case "deletecollection":
                return self._delete_collection(call)
        raise _method_not_allowed()

    @staticmethod
    def _render(kind: _Kind, obj: JSON, *, in_list: bool = False) -> JSON:
        out = _ordered(copy.deepcopy(obj), kind.schema)
        if in_list:  # typed lists leave kind/apiVersion out of their items
            out.pop("kind", None)
            out.pop("apiVersion", None)
        return out

    # --- options

    def _check_options(self, call: _Call, options_kind: str) -> None:
        errors: list[_FieldError] = []
        for value in call.query.get("dryRun", []):
            if value != "All":
                errors.append(
                    _FieldError("Unsupported value", "dryRun", 'supported values: "All"', value)
                )
        validation = call.param("fieldValidation")
        if validation not in (None, "", "Ignore", "Warn", "Strict"):
            errors.append(
                _FieldError(
                    "Unsupported value",
                    "fieldValidation",
                    'supported values: "Ignore", "Strict", "Warn"',
                    validation,
                )
            )
        if options_kind == "PatchOptions":
            manager = call.param("fieldManager")
            if call.content_type == APPLY_PATCH:
                if not manager:
                    errors.insert(
                        0,
                        _FieldError(
                            "Required value", "fieldManager", "is required for apply patch"
                        ),
                    )
            elif call.param("force") is not None:
                errors.insert(
                    0, _FieldError("Forbidden", "force", "may not be specified for non-apply patch")
                )
        if errors:
            raise _options_invalid(options_kind, errors)

    # --- decoding

    def _parse_body(self, call: _Call) -> Any:
        if call.content_type in (None, "", "application/json"):
            loader = "json"
        elif call.content_type in ("application/yaml", "text/yaml", "application/x-yaml"):
            loader = "yaml"
        else:
            raise _unsupported_media(BODY_TYPES)
        return self._load(call.body, loader)

    @staticmethod
    def _load(body: bytes, loader: str) -> Any:
        try:
            if loader == "yaml":
                return yaml.safe_load(body.decode("utf-8"))
            return json.loads(body)
        except (ValueError, yaml.YAMLError) as exc:
            raise _bad_request(f"couldn't get version/kind; json parse error: {exc}") from None

    def _decode_object(self, call: _Call, raw: Any) -> JSON:
        """The body as the Go type: type errors 400, unknown fields dropped with a warning."""
        kind = call.kind
        prefix = f'{kind.kind} in version "v1" cannot be handled as a {kind.kind}'
        if not isinstance(raw, dict):
            raise _bad_request(
                f"{prefix}: json: cannot unmarshal {_json_type(raw)} into Go value of type struct"
            )
        if raw.get("apiVersion") not in (None, "v1"):
            raise _bad_request(
                f"the API version in the data ({raw['apiVersion']}) does not match the "
                "expected API version (v1)"
            )
        if raw.get("kind") not in (None, "", kind.kind):
            raise _bad_request(
                f"the object provided is unrecognized (must be of type {kind.kind}): "
                f"kind {raw['kind']}"
            )
        unknown: list[str] = []
        try:
            obj = _decode(raw, kind.schema, "", unknown, kind.kind)
        except _DecodeError as exc:
            raise _bad_request(f"{prefix}: {exc}") from None
        if unknown:
            directive = call.param("fieldValidation") or "Warn"
            texts = [f'unknown field "{path}"' for path in unknown]
            if directive == "Strict":
                raise _bad_request(f"{prefix}: strict decoding error: {', '.join(texts)}")
            if directive == "Warn":
                call.warnings.extend(texts)
        assert isinstance(obj, dict)
        return obj

    def _check_name(self, call: _Call, obj: JSON) -> None:
        """rest.EnsureObjectNamespaceMatchesRequestNamespace and checkName."""
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace") or ""
        if call.kind.namespaced:
            if ns and ns != call.namespace:
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = call.namespace
        else:
            meta.pop("namespace", None)
        if call.name is not None and meta.get("name", "") != call.name:
            raise _bad_request(
                f"the name of the object ({meta.get('name', '')}) does not match the name on "
                f"the URL ({call.name})"
            )

    # --- normalising & validating

    def _prepare(self, kind: _Kind, obj: JSON, old: JSON | None) -> JSON:
        """Defaults and server-owned fields (what PrepareForCreate/Update and defaulting do)."""
        obj["kind"], obj["apiVersion"] = kind.kind, "v1"
        meta = obj["metadata"]
        for server_owned in (
            "selfLink",
            "generation",
            "managedFields",
            "deletionGracePeriodSeconds",
        ):
            meta.pop(server_owned, None)
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _timestamp()
            meta.pop("deletionTimestamp", None)
        else:
            old_meta = old["metadata"]
            meta.setdefault("uid", old_meta["uid"])
            meta["creationTimestamp"] = old_meta["creationTimestamp"]
            if "deletionTimestamp" in old_meta:
                meta["deletionTimestamp"] = old_meta["deletionTimestamp"]
            else:
                meta.pop("deletionTimestamp", None)
            meta.pop("resourceVersion", None)
            meta["resourceVersion"] = old_meta["resourceVersion"]
        if kind is SECRETS:
            string_data = obj.pop("stringData", None) or {}
            if string_data:
                data = obj.setdefault("data", {})
                for key, value in string_data.items():
                    data[key] = base64.b64encode(value.encode("utf-8")).decode("ascii")
            if not obj.get("type"):
                obj["type"] = "Opaque"
        if kind is NAMESPACES:
            meta["labels"] = {**(meta.get("labels") or {}), NAMESPACE_NAME_LABEL: meta["name"]}
            if old is None:
                obj["spec"] = {"finalizers": ["kubernetes"]}
                obj["status"] = {"phase": "Active"}
            else:  # finalizers and status are owned by the /finalize and /status subresources
                obj["spec"] = copy.deepcopy(old.get("spec", {}))
                obj["status"] = copy.deepcopy(old.get("status", {}))
        return _ordered(_omit_empty(obj, kind.schema), kind.schema)

    @staticmethod
    def _validate_meta(kind: _Kind, obj: JSON, old: JSON | None) -> list[_FieldError]:
        errors: list[_FieldError] = []
        meta = obj["metadata"]
        name = meta.get("name", "")
        if old is None:
            if not name:
                errors.append(
                    _FieldError(
                        "Required value", "metadata.name", "name or generateName is required"
                    )
                )
            else:
                rules = _dns_label_errors if kind is NAMESPACES else _dns_subdomain_errors
                errors.extend(
                    _FieldError("Invalid value", "metadata.name", msg, name) for msg in rules(name)
                )
        else:
            uid = meta.get("uid")
            if uid != old["metadata"]["uid"]:
                errors.append(
                    _FieldError("Invalid value", "metadata.uid", "field is immutable", uid)
                )
        for key, value in (meta.get("labels") or {}).items():
            errors.extend(
                _FieldError("Invalid value", "metadata.labels", msg, key)
                for msg in _qualified_name_errors(key)
            )
            errors.extend(
                _FieldError("Invalid value", "metadata.labels", msg, value)
                for msg in _label_value_errors(value)
            )
        annotations = meta.get("annotations") or {}
        size = 0
        for key, value in annotations.items():
            size += len(key) + len(value)
            errors.extend(
                _FieldError("Invalid value", "metadata.annotations", msg, key)
                for msg in _qualified_name_errors(key.lower())
            )
        if size > MAX_ANNOTATION_BYTES:
            errors.append(
                _FieldError(
                    "Too long",
                    "metadata.annotations",
                    f"must have at most {MAX_ANNOTATION_BYTES} bytes",
                )
            )
        return errors

    def _validate(self, kind: _Kind, obj: JSON, old: JSON | None) -> None:
        errors = self._validate_meta(kind, obj, old)
        if kind is SECRETS:
            errors.extend(self._validate_secret(obj, old))
        if errors:
            raise _invalid(kind.kind, obj["metadata"].get("name", ""), errors)

    @staticmethod
    def _validate_secret(obj: JSON, old: JSON | None) -> list[_FieldError]:
        """ValidateSecret and ValidateSecretUpdate (pkg/apis/core/validation)."""
        errors: list[_FieldError] = []
        data: dict[str, str] = obj.get("data") or {}
        decoded = {key: base64.b64decode(value) for key, value in data.items()}
        total = 0
        for key, value in decoded.items():
            errors.extend(
                _FieldError("Invalid value", f"data[{key}]", msg, key)
                for msg in _config_key_errors(key)
            )
            total += len(value)
        if total > MAX_SECRET_BYTES:
            errors.append(
                _FieldError("Too long", "data", f"must have at most {MAX_SECRET_BYTES} bytes")
            )
        secret_type = obj.get("type", "Opaque")

        def require(key: str) -> bytes | None:
            if key not in decoded:
                errors.append(_FieldError("Required value", f"data[{key}]"))
                return None
            return decoded[key]

        if secret_type == "kubernetes.io/service-account-token":
            annotations = obj["metadata"].get("annotations") or {}
            if not annotations.get("kubernetes.io/service-account.name"):
                errors.append(
                    _FieldError(
                        "Required value",
                        "metadata.annotations[kubernetes.io/service-account.name]",
                    )
                )
        elif secret_type in ("kubernetes.io/dockercfg", "kubernetes.io/dockerconfigjson"):
            key = ".dockercfg" if secret_type == "kubernetes.io/dockercfg" else ".dockerconfigjson"
            raw = require(key)
            if raw is not None:
                problem = _go_json_error(raw)
                if problem is not None:
                    errors.append(
                        _FieldError(
                            "Invalid value", f"data[{key}]", problem, "<secret contents redacted>"
                        )
                    )
        elif secret_type == "kubernetes.io/basic-auth":
            if "username" not in decoded and "password" not in decoded:
                errors.append(_FieldError("Required value", "data[username]"))
                errors.append(_FieldError("Required value", "data[password]"))
        elif secret_type == "kubernetes.io/ssh-auth":
            require("ssh-privatekey")
        elif secret_type == "kubernetes.io/tls":
            require("tls.key")
            require("tls.crt")
        if old is not None:
            old_type = old.get("type", "Opaque")
            if secret_type != old_type:
                errors.append(
                    _FieldError("Invalid value", "type", "field is immutable", secret_type)
                )
            if old.get("immutable") is True:
                if obj.get("immutable") is not True:
                    errors.append(
                        _FieldError(
                            "Forbidden", "immutable", "field is immutable when `immutable` is set"
                        )
                    )
                if (obj.get("data") or {}) != (old.get("data") or {}):
                    errors.append(
                        _FieldError(
                            "Forbidden", "data", "field is immutable when `immutable` is set"
                        )
                    )
        return errors

    def _admit_create(self, call: _Call, name: str) -> None:
        """NamespaceLifecycle: no content in a missing or terminating namespace."""
        if not call.kind.namespaced:
            return
        assert call.namespace is not None
        namespace = self._stored(NAMESPACES, None, call.namespace)
        if namespace is None:
            raise _not_found("namespaces", call.namespace)
        if namespace["status"].get("phase") == "Terminating":
            why = (
                f"unable to create new content in namespace {call.namespace} because it is "
                "being terminated"
            )
            cause = {
                "reason": "NamespaceTerminating",
                "message": f"namespace {call.namespace} is being terminated",
                "field": "metadata.namespace",
            }
            raise _forbidden(call.kind.resource, name, why, [cause])

    # --- list

    def _select(self, call: _Call) -> list[JSON]:
        try:
            labels = parse_label_selector(call.param("labelSelector") or "")
        except ValueError as exc:
            raise _bad_request(f"unable to parse requirement: {exc}") from None
        try:
            fields = _parse_field_selector(call.param("fieldSelector") or "", call.kind)
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        out = []
        for (ns, _name), obj in sorted(self._store[call.kind.resource].items()):
            if call.namespace is not None and ns != call.namespace:
                continue
            obj_labels = obj["metadata"].get("labels") or {}
            if not all(req.matches(obj_labels) for req in labels):
                continue
            if not all((_field_value(obj, k) == v) == eq for k, eq, v in fields):
                continue
            out.append(obj)
        return out

    def _list(self, call: _Call) -> _Reply:
        items = self._select(call)
        start = 0
        token = call.param("continue")
        if token:
            try:
                start = int(json.loads(base64.urlsafe_b64decode(token))["start"])
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise _bad_request("continue key is not valid: illegal base64 data") from None
        meta: JSON = {"resourceVersion": str(self._rv)}
        limit_text = call.param("limit")
        limit = int(limit_text) if limit_text and limit_text.isdigit() else 0
        page = items[start:]
        if limit > 0 and len(page) > limit:
            page = page[:limit]
            following = {"v": "meta.k8s.io/v1", "rv": self._rv, "start": start + limit}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(following).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        body = {
            "kind": f"{call.kind.kind}List",
            "apiVersion": "v1",
            "metadata": meta,
            "items": [self._render(call.kind, obj, in_list=True) for obj in page],
        }
        return _json_reply(200, body)

    # --- create

    def _create(self, call: _Call) -> _Reply:
        self._check_options(call, "CreateOptions")
        obj = self._decode_object(call, self._parse_body(call))
        self._check_name(call, obj)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
            meta["name"] = meta["generateName"] + suffix
        name = meta.get("name", "")
        self._admit_create(call, name)
        given_rv = meta.pop("resourceVersion", "")
        new = self._prepare(call.kind, obj, None)
        self._validate(call.kind, new, None)
        if given_rv:
            # etcd3 store.Create: a plain error, so reason "" and code 500.
            raise _fail(500, "", "resourceVersion should not be set on objects to be created")
        if self._stored(call.kind, call.namespace, name) is not None:
            raise _already_exists(call.kind.resource, name)
        if call.dry_run:
            return _json_reply(201, self._render(call.kind, new))
        self._write(call.kind, new)
        if call.kind is NAMESPACES:
            self._schedule_default_sa(name, self.default_sa_delay)
        return _json_reply(201, self._render(call.kind, new))

    # --- update & patch

    def _update(self, call: _Call) -> _Reply:
        self._check_options(call, "UpdateOptions")
        obj = self._decode_object(call, self._parse_body(call))
        self._check_name(call, obj)
        assert call.name is not None
        old = self._stored(call.kind, call.namespace, call.name)
        if old is None:
            raise _not_found(call.kind.resource, call.name)
        return self._commit_update(call, obj, old)

    def _commit_update(self, call: _Call, obj: JSON, old: JSON, *, status: int = 200) -> _Reply:
        """The store's Update: precondition, then validation, then a write unless a no-op."""
        assert call.name is not None
        given_rv = obj["metadata"].get("resourceVersion") or ""
        if given_rv and given_rv != old["metadata"]["resourceVersion"]:
            raise _conflict(call.kind.resource, call.name)
        new = self._prepare(call.kind, obj, old)
        self._validate(call.kind, new, old)
        if new == old or call.dry_run:  # a no-op update writes nothing, keeps resourceVersion
            return _json_reply(status, self._render(call.kind, new))
        self._write(call.kind, new)
        return _json_reply(status, self._render(call.kind, new))

    def _patch(self, call: _Call) -> _Reply:
        if call.content_type not in PATCH_TYPES:
            raise _unsupported_media(PATCH_TYPES)
        self._check_options(call, "PatchOptions")
        assert call.name is not None
        loader = "yaml" if call.content_type == APPLY_PATCH else "json"
        patch = self._load(call.body, loader)
        old = self._stored(call.kind, call.namespace, call.name)
        if call.content_type == JSON_PATCH:
            if not isinstance(patch, list):
                raise _bad_request(
                    f"json: cannot unmarshal {_json_type(patch)} into Go value of type "
                    "jsonpatch.Patch"
                )
        elif not isinstance(patch, dict):
            raise _bad_request(
                f"json: cannot unmarshal {_json_type(patch)} into Go value of type "
                "map[string]interface {}"
            )
        if call.content_type == APPLY_PATCH:
            assert isinstance(patch, dict)
            if patch.get("apiVersion") != "v1" or patch.get("kind") != call.kind.kind:
                raise _bad_request(
                    f"invalid object type: {patch.get('apiVersion', '')}, "
                    f"Kind={patch.get('kind', '')}; apply needs apiVersion v1 and "
                    f"kind {call.kind.kind}"
                )
            if old is None:  # server-side apply creates
                obj = self._decode_object(call, patch)
                self._check_name(call, obj)
                self._admit_create(call, call.name)
                new = self._prepare(call.kind, obj, None)
                self._validate(call.kind, new, None)
                if not call.dry_run:
                    self._write(call.kind, new)
                    if call.kind is NAMESPACES:
                        self._schedule_default_sa(call.name, self.default_sa_delay)
                return _json_reply(201, self._render(call.kind, new))
        if old is None:
            raise _not_found(call.kind.resource, call.name)
        current = self._render(call.kind, old)
        try:
            if call.content_type == JSON_PATCH:
                assert isinstance(patch, list)
                patched = apply_json_patch(current, patch)
            elif call.content_type == STRATEGIC_MERGE_PATCH:
                assert isinstance(patch, dict)
                patched = apply_strategic_merge_patch(current, patch, call.kind.resource)
            else:  # merge patch, and apply treated as a merge (no field ownership)
                patched = apply_merge_patch(current, patch)
        except _PatchError as exc:
            if call.content_type == JSON_PATCH:
                raise _generic_invalid() from None
            raise _bad_request(str(exc)) from None
        obj = self._decode_object(call, patched)
        self._check_name(call, obj)
        return self._commit_update(call, obj, old)

    # --- delete

    def _delete_options(self, call: _Call) -> JSON:
        if not call.body:
            return {}
        options = self._load(call.body, "json")
        if not isinstance(options, dict):
            raise _bad_request("the body of a delete must be a DeleteOptions object")
        for value in options.get("dryRun") or []:
            call.query.setdefault("dryRun", []).append(value)
        return options

    def _delete(self, call: _Call) -> _Reply:
        options = self._delete_options(call)
        self._check_options(call, "DeleteOptions")
        assert call.name is not None
        old = self._stored(call.kind, call.namespace, call.name)
        if old is None:
            raise _not_found(call.kind.resource, call.name)
        pre = options.get("preconditions") or {}
        meta = old["metadata"]
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            why = (
                f"Precondition failed: UID in precondition: {pre['uid']}, "
                f"UID in object meta: {meta['uid']}"
            )
            raise _conflict(call.kind.resource, call.name, why)
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            why = (
                "Precondition failed: ResourceVersion in precondition: "
                f"{pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {meta['resourceVersion']}"
            )
            raise _conflict(call.kind.resource, call.name, why)
        if call.kind is NAMESPACES:
            return self._delete_namespace(call, old)
        if not call.dry_run:
            del self._store[call.kind.resource][self._key(call.kind, call.namespace, call.name)]
            self._next_rv()
            if call.kind is SERVICE_ACCOUNTS and call.name == "default":
                assert call.namespace is not None
                self._schedule_default_sa(call.namespace, self.default_sa_delay)
        details = _details(call.name, call.kind.resource, uid=meta["uid"])
        return _json_reply(200, _status_body(0, "", "", details, success=True))

    def _delete_namespace(self, call: _Call, old: JSON) -> _Reply:
        assert call.name is not None
        if call.name in UNDELETABLE_NAMESPACES:
            raise _forbidden("namespaces", call.name, "this namespace may not be deleted")
        if old["status"].get("phase") == "Terminating":
            raise _conflict("namespaces", call.name, NAMESPACE_PURGE_MESSAGE)
        new = copy.deepcopy(old)
        new["metadata"]["deletionTimestamp"] = _timestamp()
        new["status"]["phase"] = "Terminating"
        new = _ordered(new, NAMESPACES.schema)
        if not call.dry_run:
            self._write(NAMESPACES, new)
            self._pending_sa.pop(call.name, None)
            self._terminating[call.name] = time.monotonic() + max(0.0, self.termination_delay)
        return _json_reply(200, self._render(NAMESPACES, new))

    def _delete_collection(self, call: _Call) -> _Reply:
        self._delete_options(call)
        self._check_options(call, "DeleteOptions")
        doomed = self._select(call)
        if not call.dry_run:
            for obj in doomed:
                meta = obj["metadata"]
                del self._store[call.kind.resource][
                    self._key(call.kind, meta.get("namespace"), meta["name"])
                ]
                self._next_rv()
        body = {
            "kind": f"{call.kind.kind}List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": [self._render(call.kind, obj, in_list=True) for obj in doomed],
        }
        return _json_reply(200, body)


# --------------------------------------------------------------------------- the test fixture value


class K8sCluster:
    """What the ``k8s_cluster`` fixture yields: an emulator, a kubeconfig and client helpers."""

    def __init__(self, emulator: K8sEmulator, kubeconfig: Path, context: str) -> None:
        self.emulator = emulator
        self.kubeconfig = kubeconfig
        self.context = context
        self._clients: list[k8s_client.ApiClient] = []

    def api_client(self, *, context: str | None = None) -> k8s_client.ApiClient:
        """A kubernetes.client.ApiClient built from the kubeconfig (closed at teardown)."""
        client = k8s_config.new_client_from_config(
            config_file=str(self.kubeconfig),
            context=context or self.context,
            persist_config=False,
        )
        self._clients.append(client)
        return client

    def core_v1(self, *, context: str | None = None) -> k8s_client.CoreV1Api:
        """A kubernetes.client.CoreV1Api on a fresh ApiClient (closed at teardown)."""
        return k8s_client.CoreV1Api(self.api_client(context=context))

    def close(self) -> None:
        for api_client in self._clients:
            api_client.close()
        self._clients.clear()
