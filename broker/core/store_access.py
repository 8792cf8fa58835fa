"""What every domain module needs around the store: its failures as domain errors,
and opaque page tokens."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, TypeVar

from broker.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from broker.stores.base import (
    StoreCorrupt,
    StoreError,
    StorePermissionDenied,
    StoreUnavailable,
    VersionConflict,
)

_T = TypeVar("_T")
_A = TypeVar("_A")


def call_store(call: Callable[[_A], _T], arg: _A) -> _T:
    """Call the store, turning its failures (but a version conflict) into domain errors."""
    try:
        return call(arg)
    except VersionConflict:
        raise
    except StoreUnavailable as exc:
        raise Unavailable(
            f"the secret store is unavailable: {exc}", reason="STORE_UNAVAILABLE"
        ) from None
    except StoreCorrupt as exc:
        raise Unavailable(
            f"the secret store cannot be read: {exc}", reason="STORE_CORRUPT"
        ) from None
    except StorePermissionDenied as exc:
        raise FailedPrecondition(
            f"the secret store refused the broker: {exc}", reason="STORE_PERMISSION_DENIED"
        ) from None
    except StoreError as exc:
        raise Unavailable(f"the secret store failed: {exc}", reason="STORE_ERROR") from None


def encode_page_token(after: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


def decode_page_token(token: str, method: str, max_length: int) -> Any:
    """The `after` value of a token made by `encode_page_token`, unchecked (the caller
    checks its shape); INVALID_ARGUMENT naming `page_token` when it is not such a token."""
    invalid = InvalidArgument.single("page_token", f"is not a token returned by {method}")
    # A longer token than ours could only feed json.loads deeply nested brackets
    # (RecursionError).
    if len(token) > max_length:
        raise invalid
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise invalid from None
