"""The one interceptor that authenticates, rate-limits, authorises and audits every RPC.

Order inside a call: open methods (health, reflection) pass untouched; then
authentication (bearer token, else client certificate), the per-principal
rate limit, the role check — all before the servicer runs, so a caller without
permission never learns whether a resource exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
from google.rpc import code_pb2

from broker.api.context import current_actor
from broker.api.errors import code_of
from broker.api.interceptors import AroundInterceptor
from broker.core.audit import Actor
from broker.core.errors import BrokerError, PermissionDenied, ResourceExhausted, Unauthenticated
from broker.security.audit import AuditTrail
from broker.security.authz import AUDITED_METHODS, OPEN_METHODS, is_allowed
from broker.security.principals import Principal, PrincipalRegistry
from broker.security.ratelimit import TokenBuckets

MAX_TOKEN_LENGTH = 512
MAX_AUDITED_FIELD = 512
_ALWAYS_AUDITED_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})


def peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5000` -> `127.0.0.1`, `ipv6:[::1]:5000` -> `::1`."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def certificate_identities(context: grpc.ServicerContext) -> list[str]:
    """`cn:<subject CN>` and `uri:<SAN URI>` of a verified client certificate."""
    # grpc-stubs types this as Mapping[str, bytes]; it maps to lists of bytes.
    auth: dict[str, list[bytes]] = dict(context.auth_context())  # type: ignore[arg-type]
    identities = [f"cn:{v.decode()}" for v in auth.get("x509_common_name", [])]
    # gRPC puts the URI SANs, and only those, under peer_uri;
    # x509_subject_alternative_name mixes in DNS names, e-mail and IP addresses.
    identities += [f"uri:{v.decode()}" for v in auth.get("peer_uri", [])]
    return identities


def _resource_of(request: Any) -> tuple[str, str]:
    """The resource name and image a request is about, for the audit record."""
    if not hasattr(request, "DESCRIPTOR"):  # a body that did not parse
        return "", ""
    fields = request.DESCRIPTOR.fields_by_name
    resource = ""
    if "name" in fields:
        resource = request.name
    elif "image_host_id" in fields and request.image_host_id:
        resource = f"imageHosts/{request.image_host_id}"
    elif "image_host" in fields and request.HasField("image_host"):
        resource = request.image_host.name
    image = request.image if "image" in fields else ""
    # Callers choose these strings: keep one audit line bounded whatever they send.
    return resource[:MAX_AUDITED_FIELD], image[:MAX_AUDITED_FIELD]


class SecurityInterceptor(AroundInterceptor):
    def __init__(
        self,
        principals: PrincipalRegistry,
        audit: AuditTrail,
        *,
        call_rate: TokenBuckets,
        failed_logins: TokenBuckets,
    ) -> None:
        self._principals = principals
        self._audit = audit
        self._call_rate = call_rate
        self._failed_logins = failed_logins

    @contextlib.contextmanager
    def around(self, method: str, request: Any, context: grpc.ServicerContext) -> Iterator[None]:
        if method in OPEN_METHODS:
            yield
            return
        peer = context.peer()
        principal_name = "-"
        code = "OK"
        error_reason = ""
        with self._audit.call() as details:
            try:
                principal = self._authenticate(context, peer_host(peer))
                principal_name = principal.name
                if not self._call_rate.take(principal.name):
                    raise ResourceExhausted(
                        f"principal {principal.name} is over its call rate; slow down",
                        reason="RATE_LIMITED",
                    )
                if not is_allowed(principal, method):
                    raise PermissionDenied(
                        f"principal {principal.name} (roles: {', '.join(sorted(principal.roles))}) "
                        f"may not call {method.rsplit('/', 1)[-1]}",
                        reason="METHOD_NOT_ALLOWED",
                    )
                actor = Actor(principal.name, peer, principal.image_hosts)
                token = current_actor.set(actor)
                try:
                    yield
                finally:
                    current_actor.reset(token)
            except BrokerError as exc:
                code = code_pb2.Code.Name(code_of(exc))
                error_reason = exc.reason
                raise
            except GeneratorExit:
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                raise
            finally:
                if method in AUDITED_METHODS or code in _ALWAYS_AUDITED_CODES:
                    resource, image = _resource_of(request)
                    self._audit.write(
                        {
                            "audit": method.rsplit("/", 1)[-1],
                            "principal": principal_name,
                            "peer": peer,
                            "method": method,
                            "resource": resource,
                            "image": image,
                            "outcome": "OK" if code == "OK" else "FAILED",
                            "code": code,
                            "error_reason": error_reason,
                            **details,
                        }
                    )

    def _authenticate(self, context: grpc.ServicerContext, host: str) -> Principal:
        headers = [
            str(value) for key, value in context.invocation_metadata() if key == "authorization"
        ]
        if len(headers) > 1:
            raise Unauthenticated(
                "send one authorization header, not several", reason="BAD_CREDENTIALS"
            )
        if headers:
            return self._by_bearer_token(headers[0], host)
        identities = certificate_identities(context)
        if identities:
            principal = self._principals.by_certificate(identities)
            if principal is None:
                raise Unauthenticated(
                    f"client certificate ({', '.join(identities)}) is not mapped to a principal",
                    reason="UNKNOWN_CERTIFICATE",
                )
            return principal
        raise Unauthenticated(
            "credentials required: send 'authorization: Bearer <token>' or a client certificate",
            reason="CREDENTIALS_REQUIRED",
        )

    def _by_bearer_token(self, header: str, host: str) -> Principal:
        # Reserve a failure before checking, atomically: an address that keeps
        # failing cannot keep guessing, not even with many calls at once.
        if not self._failed_logins.take(host):
            wait = self._failed_logins.retry_after(host)
            raise ResourceExhausted(
                f"too many failed authentication attempts from this address; retry in {wait:.0f} s",
                reason="AUTHENTICATION_RATE_LIMITED",
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        principal = None
        if scheme.lower() == "bearer" and 0 < len(token) <= MAX_TOKEN_LENGTH:
            principal = self._principals.by_token(token)
        if principal is None:
            raise Unauthenticated(
                "the authorization header is not 'Bearer <token>' with a valid token",
                reason="INVALID_TOKEN",
            )
        self._failed_logins.give_back(host)
        return principal
