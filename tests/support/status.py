"""Read google.rpc details out of a failed gRPC call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class CallError:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: dict[str, str] = field(default_factory=dict)


def details_of(error: grpc.RpcError) -> CallError:
    call: Any = error
    result = CallError(code=call.code(), message=call.details() or "")
    status = rpc_status.from_call(call)
    if status is None:
        return result
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            result.reason = info.reason
            result.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            result.violations = {v.field: v.description for v in bad.field_violations}
    return result


def expect_error(call: Callable[[], object]) -> CallError:
    """Run `call`, which must fail, and return what the status said."""
    try:
        call()
    except grpc.RpcError as error:
        return details_of(error)
    raise AssertionError("the call succeeded but was expected to fail")
