"""The one place where domain errors become gRPC statuses.

Every servicer method runs inside `ErrorMappingInterceptor`: a BrokerError
becomes its status code with an ErrorInfo (and BadRequest field violations);
anything unexpected becomes INTERNAL with an incident id, and its text stays
in the server log, never in the answer.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.api.interceptors import AroundInterceptor
from broker.core import errors

ERROR_DOMAIN = "credbroker.dev"

_log = logging.getLogger("credbroker.errors")


class MalformedRequest(errors.BrokerError):
    """The request body does not parse as the method's request message."""

    reason = "MALFORMED_REQUEST"


_CODES: list[tuple[type[errors.BrokerError], int]] = [
    (MalformedRequest, code_pb2.INVALID_ARGUMENT),
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.Aborted, code_pb2.ABORTED),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (errors.Cancelled, code_pb2.CANCELLED),
    (errors.DeadlineExceeded, code_pb2.DEADLINE_EXCEEDED),
]


def code_of(error: errors.BrokerError) -> int:
    return next((c for kind, c in _CODES if isinstance(error, kind)), code_pb2.INTERNAL)


def status_for(error: errors.BrokerError) -> status_pb2.Status:
    code = code_of(error)
    details: list[Any] = [
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    ]
    if isinstance(error, errors.InvalidArgument):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in error.violations
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code, message=error.message, details=packed)


def _internal_status(method: str, exc: BaseException) -> status_pb2.Status:
    incident = secrets.token_hex(6)
    # The exception text may quote request data: log its type and frames, not its message.
    _log.error(
        "unexpected %s in %s (incident %s)\n%s",
        type(exc).__name__,
        method,
        incident,
        "".join(traceback.format_tb(exc.__traceback__)),
    )
    error = errors.BrokerError(f"internal error (incident {incident})", reason="INTERNAL")
    return status_for(error)


def _abort(context: grpc.ServicerContext, status: status_pb2.Status) -> None:
    context.abort_with_status(rpc_status.to_status(status))


def _guard(method: str, context: grpc.ServicerContext, exc: Exception) -> None:
    if context.code() is not None:  # type: ignore[attr-defined]
        raise exc  # already aborted by an interceptor or the servicer itself
    if isinstance(exc, errors.BrokerError):
        _abort(context, status_for(exc))
    _abort(context, _internal_status(method, exc))


class ErrorMappingInterceptor(AroundInterceptor):
    """The outermost interceptor: whatever a call raises leaves as a proper status."""

    @contextlib.contextmanager
    def around(self, method: str, request: Any, context: grpc.ServicerContext) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - mapped to a status here, once
            _guard(method, context, exc)


class _Undecodable:
    """Stands in for a request body that did not parse."""


_UNDECODABLE = _Undecodable()


class RequestDecodingInterceptor(AroundInterceptor):
    """The innermost interceptor. gRPC itself answers a body that does not parse
    with a bare INTERNAL; here it becomes INVALID_ARGUMENT (MALFORMED_REQUEST),
    raised inside the outer interceptors so that authentication still comes first."""

    def wrap_deserializer(self, method: str, deserializer: Callable[[bytes], Any]) -> Any:
        def tolerant(data: bytes) -> Any:
            try:
                return deserializer(data)
            except Exception:  # noqa: BLE001 - a body that does not parse is the caller's mistake
                return _UNDECODABLE

        return tolerant

    @contextlib.contextmanager
    def around(self, method: str, request: Any, context: grpc.ServicerContext) -> Iterator[None]:
        if request is _UNDECODABLE:
            name = method.rsplit("/", 1)[-1]
            raise MalformedRequest(f"the request body is not a valid {name} request")
        yield
