"""Helpers for the authentication/authorisation tests.

- `call_rpc` calls any registered RPC by its path (`/pkg.Service/Method`), with
  whatever metadata the test wants (no token, a wrong one, malformed headers),
  building the stubs from the descriptors so a new RPC needs no new code here;
- `Secrets` remembers every bearer token a test handles and checks texts for
  them, saying *where* a secret showed up, never the secret itself;
- `wait_until` is a bounded poll (the broker re-reads its principals file
  about once a second, and the output reader thread runs asynchronously);
- `audit_records` extracts the audit JSON lines from the broker's output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from tests.support.status import details_of

CALL_TIMEOUT = 10.0
Metadata = Sequence[tuple[str, str]]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def method_descriptor(path: str) -> MethodDescriptor:
    service, _, name = path.strip("/").partition("/")
    return descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]


def short_name(path: str) -> str:
    """`/broker.v1.ImageHostService/GetImageHost` -> `GetImageHost`."""
    return path.rsplit("/", 1)[-1]


def service_short_name(path: str) -> str:
    """`/broker.v1.ImageHostService/GetImageHost` -> `ImageHostService`."""
    return path.strip("/").split("/", 1)[0].rsplit(".", 1)[-1]


def request_class(path: str) -> type[Message]:
    return message_factory.GetMessageClass(method_descriptor(path).input_type)


@dataclass(frozen=True)
class Outcome:
    """What a call ended with; `response` is set only on success."""

    code: grpc.StatusCode
    reason: str = ""
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    response: Any = None

    def describe(self) -> str:
        return f"{self.code.name} reason={self.reason or '-'} message={self.message!r}"


def call_rpc(
    channel: grpc.Channel,
    path: str,
    request: Message,
    metadata: Metadata = (),
    *,
    timeout: float = CALL_TIMEOUT,
) -> Outcome:
    """Call any RPC (unary or streaming) and return its outcome instead of raising."""
    __tracebackhide__ = True  # the metadata may hold a token
    method = method_descriptor(path)
    response_class = message_factory.GetMessageClass(method.output_type)
    serialize = type(request).SerializeToString
    deserialize = response_class.FromString
    try:
        if method.client_streaming:
            requests = iter([request])
            if method.server_streaming:
                stub_ss = channel.stream_stream(path, serialize, deserialize)
                response: Any = list(stub_ss(requests, timeout=timeout, metadata=metadata))
            else:
                stub_su = channel.stream_unary(path, serialize, deserialize)
                response = stub_su(requests, timeout=timeout, metadata=metadata)
        elif method.server_streaming:
            stub_us = channel.unary_stream(path, serialize, deserialize)
            response = list(stub_us(request, timeout=timeout, metadata=metadata))
        else:
            stub_uu = channel.unary_unary(path, serialize, deserialize)
            response = stub_uu(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as error:
        details = details_of(error)
        return Outcome(details.code, details.reason, details.message, details.metadata)
    return Outcome(grpc.StatusCode.OK, response=response)


class Token(str):
    """A secret string whose repr never shows its value.

    pytest prints the arguments of the frames of a failing test (fixtures
    included) and the operands of failed assertions through repr(): wrapped
    this way, a token held by a fixture or passed to a helper stays hidden.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<secret>"


class Secrets:
    """Bearer tokens (and other secrets) that must never appear in any output.

    The helpers that handle texts or headers holding secrets set
    `__tracebackhide__`, so a failure never prints their arguments.
    """

    def __init__(self) -> None:
        self._values: list[str] = []

    def add(self, value: str) -> Token:
        if value and value not in self._values:
            self._values.append(str(value))
        return Token(value)

    def __len__(self) -> int:
        return len(self._values)

    def found_in(self, text: str) -> list[int]:
        return [i for i, value in enumerate(self._values) if value in text]

    def assert_absent(self, text: str, where: str) -> None:
        __tracebackhide__ = True
        leaked = self.found_in(text)
        if leaked:
            # Say which registered secret (by index) leaked and where, never its value.
            raise AssertionError(f"secret(s) #{leaked} of {len(self)} appear in {where}")

    def redact(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, "[REDACTED]")
        return text


def wait_until(
    condition: Callable[[], bool],
    what: str,
    *,
    timeout: float = 10.0,
    interval: float = 0.1,
) -> None:
    """Poll `condition` until it holds; at most timeout/interval attempts."""
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if condition():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if not condition():
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def audit_lines(text: str) -> list[str]:
    """The raw audit lines of `text`: JSON objects with an "audit" key."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("{"):
            continue
        try:
            record = json.loads(stripped)
        except ValueError:
            continue
        if isinstance(record, dict) and "audit" in record:
            lines.append(stripped)
    return lines


def audit_records(text: str) -> list[dict[str, Any]]:
    """Every audit line of `text`, parsed."""
    return [json.loads(line) for line in audit_lines(text)]
