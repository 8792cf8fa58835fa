"""Domain errors. The API layer maps each kind to one gRPC status code.

Messages are shown to callers: they name fields and rules, never secret values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class BrokerError(Exception):
    """Base of every error the broker reports to a caller on purpose."""

    #: ErrorInfo.reason, UPPER_SNAKE_CASE, stable across releases.
    reason: str = "BROKER_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(BrokerError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], *, reason: str | None = None) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one violation")
        self.violations = list(violations)
        text = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(f"invalid argument: {text}", reason=reason)

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class NotFound(BrokerError):
    reason = "NOT_FOUND"


class AlreadyExists(BrokerError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(BrokerError):
    reason = "FAILED_PRECONDITION"


class Aborted(BrokerError):
    """A compare-and-set lost: the caller should read again and retry."""

    reason = "ABORTED"


class Unavailable(BrokerError):
    """A dependency (store, engine, cluster) cannot be reached right now."""

    reason = "UNAVAILABLE"


class PermissionDenied(BrokerError):
    reason = "PERMISSION_DENIED"


class Unauthenticated(BrokerError):
    reason = "UNAUTHENTICATED"


class ResourceExhausted(BrokerError):
    reason = "RESOURCE_EXHAUSTED"


class Cancelled(BrokerError):
    """The caller went away before the work was done (it will not read this)."""

    reason = "CANCELLED"


class DeadlineExceeded(BrokerError):
    """The call's deadline passed before the work was done."""

    reason = "DEADLINE_EXCEEDED"
