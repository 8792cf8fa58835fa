"""Hypothesis fuzzing of call metadata, alone and together with message fields.

One broker serves the module (a high `--auth-failure-burst`, so that the fuzz
reaches authentication instead of only the lockout). Generated metadata:
`authorization` values built from schemes, separators, real tokens (shown in
examples as the placeholders `<admin>` / `<viewer>`, never as their values),
prefixes and suffixes, arbitrary printable text, unicode, values up to ~8 KiB,
many headers, other header names (reserved ones included) and `-bin` headers
with arbitrary bytes. Whatever is sent:

- the answer is a proper status, never UNKNOWN or INTERNAL, and every status the
  broker produces carries a google.rpc.ErrorInfo;
- authentication follows the documented rule: exactly one `authorization`
  header `Bearer <token>` (scheme in any case, surrounding spaces ignored) with a
  known token authenticates; none is CREDENTIALS_REQUIRED; several are
  BAD_CREDENTIALS; anything else is INVALID_TOKEN; a viewer gets
  PERMISSION_DENIED for RPCs it may not call;
- the broker never crashes, and still answers at the end.

grpc-python refuses some metadata before sending it (keys outside [a-z0-9-_.],
non-bin values outside printable ASCII, str values for -bin keys): such
examples are client-side errors, checked to be exactly those that break
grpc's rules, and counted as hypothesis events. Values grpc-python will not
send (non-ASCII, non-UTF-8 bytes) go through the real grpcurl binary instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as descriptor_mod
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from broker.security import authz
from broker.security.principals import Principal, PrincipalsFile
from broker.server import registered_methods
from broker.v1 import image_hosts_pb2 as pb
from broker.v1 import image_hosts_pb2_grpc
from tests.support.broker_process import BrokerProcess

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 10.0
GRPCURL = Path(sysconfig.get_path("scripts")) / "grpcurl"
STATUS_EXIT_BASE = 64
NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
ADMIN, VIEWER = "<admin>", "<viewer>"
ROLES = {ADMIN: frozenset({"admin"}), VIEWER: frozenset({"viewer"})}
# grpc core: the soft limit (--max-metadata-size, 16 KiB) may refuse metadata above it;
# well below it, nothing may be refused for size.
SURELY_SMALL_ENOUGH = 12 * 1024
_LEGAL_KEY = re.compile(r"[a-z0-9_.-]+")
_INCIDENT = re.compile(r"unexpected \w+ in /|internal error \(incident")


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the broker -------------------------------------------------------------------


class Fuzzed:
    """The module's broker, its bearer tokens (by placeholder) and a channel.

    Not a dataclass: hypothesis prints the fixtures of a failing example with its own
    pretty-printer, which shows every dataclass field; this repr names no token."""

    def __init__(self, process: BrokerProcess, tokens: dict[str, str], channel: grpc.Channel):
        self.process = process
        self.tokens = tokens  # placeholder -> bearer token
        self.channel = channel

    def __repr__(self) -> str:
        return f"Fuzzed(broker at {self.process.address})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def admin_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.tokens[ADMIN]}")]

    def render(self, value: str) -> str:
        for placeholder, token in self.tokens.items():
            value = value.replace(placeholder, token)
        return value

    def render_value(self, value: str | bytes) -> str | bytes:
        if isinstance(value, str):
            return self.render(value)
        for placeholder, token in self.tokens.items():
            value = value.replace(placeholder.encode(), token.encode())
        return value

    def hide(self, text: str) -> str:
        for placeholder, token in self.tokens.items():
            text = text.replace(token, placeholder)
        return text


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    data_dir = tmp_path_factory.mktemp("metadata-fuzz") / "data"
    # Principals before the start: no polling with unknown tokens.
    source = PrincipalsFile(data_dir / "principals.json")
    tokens = {}
    for placeholder, name in ((ADMIN, "admin"), (VIEWER, "fuzz-viewer")):
        token = source.add(name, sorted(ROLES[placeholder]))
        assert token is not None
        tokens[placeholder] = token
    fd = os.open(data_dir / "admin.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, tokens[ADMIN].encode() + b"\n")
    finally:
        os.close(fd)
    process = BrokerProcess(
        data_dir,
        args=["--auth-failure-burst", "1000000", "--rate-limit", "1000000"],
    ).start()
    channel = grpc.insecure_channel(process.address)
    try:
        yield Fuzzed(process, tokens, channel)
    finally:
        channel.close()
        process.stop()


# -- what grpc-python sends, and what the broker must answer ----------------------

Metadata = tuple[tuple[str, str | bytes], ...]


def grpc_sends(key: str, value: str | bytes) -> bool:
    """grpc's metadata rules (src/core/lib/surface/validate_metadata.cc)."""
    if not _LEGAL_KEY.fullmatch(key):
        return False
    if key.endswith("-bin"):
        return isinstance(value, bytes)
    return isinstance(value, str) and all(0x20 <= ord(c) <= 0x7E for c in value)


def metadata_size(metadata: Sequence[tuple[str, str | bytes]]) -> int:
    # 32 bytes of HPACK overhead per entry; -bin values travel base64-encoded.
    return sum(
        len(k) + 32 + (len(v) * 4 // 3 + 4 if isinstance(v, bytes) else len(v)) for k, v in metadata
    )


def expected_auth(
    fuzzed: Fuzzed, metadata: Metadata, method: str
) -> tuple[grpc.StatusCode, str] | None:
    """(code, reason) the broker must answer for these headers, or None: authorised."""
    values = [str(v) for k, v in metadata if k == "authorization"]
    if len(values) > 1:
        return grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS"
    if not values:
        return grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_REQUIRED"
    scheme, _, token = fuzzed.render(values[0]).strip().partition(" ")
    who = next(
        (p for p, t in fuzzed.tokens.items() if t == token.strip()),
        None,
    )
    if scheme.lower() != "bearer" or who is None:
        return grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"
    if not authz.is_allowed(Principal(who, ROLES[who]), method):
        return grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED"
    return None


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    reason: str
    message: str
    client_side: bool = False


def send(fuzzed: Fuzzed, method: str, request: Message, metadata: Metadata) -> Answer:
    """Call any registered RPC (unary or streaming) with these headers, placeholders filled."""
    __tracebackhide__ = True  # its locals carry tokens
    rendered = [(k, fuzzed.render_value(v)) for k, v in metadata]
    descriptor = _method_descriptor(method)
    response = GetMessageClass(descriptor.output_type)
    kind = ("stream" if descriptor.client_streaming else "unary") + (
        "_stream" if descriptor.server_streaming else "_unary"
    )
    call = getattr(fuzzed.channel, kind)(
        method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response.FromString,
    )
    argument: Any = iter([request]) if descriptor.client_streaming else request
    try:
        answer = call(argument, metadata=rendered, timeout=CALL_TIMEOUT)
        if descriptor.server_streaming:
            for _ in zip(range(100), answer, strict=False):
                pass
            answer.cancel()
    except grpc.RpcError as error:
        failed: Any = error
        code: grpc.StatusCode = failed.code()
        message = fuzzed.hide(failed.details() or "")
        refused_here = code == grpc.StatusCode.INTERNAL and message == "Invalid metadata"
        if refused_here and not failed.debug_error_string():  # never sent
            return Answer(code, "", message, client_side=True)
        try:
            status = rpc_status.from_call(failed)
        except ValueError:
            status = None
        reason = ""
        for packed in status.details if status else ():
            if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                packed.Unpack(info)
                reason = info.reason
        return Answer(code, reason, message)
    except (TypeError, ValueError) as exc:  # e.g. a str value for a -bin key
        return Answer(grpc.StatusCode.UNKNOWN, "", type(exc).__name__, client_side=True)
    return Answer(grpc.StatusCode.OK, "", "")


def check(fuzzed: Fuzzed, method: str, metadata: Metadata, answer: Answer) -> None:
    """The answer is proper, and authentication followed the documented rule."""
    shown = fuzzed.hide(repr(metadata))[:600]
    said = f"{method.rsplit('/', 1)[-1]} -> {answer.code.name} {answer.reason} {answer.message!r}"
    legal = all(grpc_sends(k, v) for k, v in metadata)
    if answer.client_side:
        assert not legal, f"grpc-python refused metadata its rules allow: {shown}"
        event("refused by grpc-python before sending")
        return
    assert fuzzed.process.process.poll() is None, "the broker died"
    assert answer.code not in NEVER, f"{said}; metadata {shown}"
    if answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size" in answer.message:
        size = metadata_size(metadata)
        assert size > SURELY_SMALL_ENOUGH, f"{size} bytes of metadata refused for size: {said}"
        event("metadata too large for grpc core")
        return
    if answer.code != grpc.StatusCode.OK:
        assert answer.reason, f"no ErrorInfo reason: {said}; metadata {shown}"
    expected = expected_auth(fuzzed, metadata, method)
    if expected is None:
        event("authenticated")
        assert answer.code not in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), f"{said}; metadata {shown}"
    else:
        event(f"refused: {expected[1]}")
        assert (answer.code, answer.reason) == expected, f"{said}; metadata {shown}"


# -- strategies ----------------------------------------------------------------------

printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
short_text = st.text(printable, max_size=24)
long_text = st.builds(
    lambda c, n, tail: c * n + tail,
    st.sampled_from(list("aZ9-=/+_ .")),
    st.integers(min_value=500, max_value=8 * 1024),
    short_text,
)
any_unicode = st.text(max_size=16)  # controls, non-ASCII: grpc-python refuses most
token_ref = st.sampled_from([ADMIN, VIEWER])
token_like = st.one_of(
    token_ref,
    st.builds(lambda t, s: t + s, token_ref, short_text),
    st.builds(lambda p, t: p + t, short_text, token_ref),
    st.builds(lambda t: t[:-1], token_ref),
    short_text,
    long_text,
)
spaces = st.sampled_from(["", " ", "  ", "   "])
# `Bearer <token>` as the README says, in any case, with spaces around: authenticates.
good_authorization = st.builds(
    lambda pre, scheme, sep, token, post: pre + scheme + sep + token + post,
    spaces,
    st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]),
    st.sampled_from([" ", "  "]),
    token_ref,
    spaces,
)
# Near misses and junk: other schemes, no separator, altered tokens, long values.
other_authorization = st.one_of(
    st.builds(
        lambda pre, scheme, sep, token, post: pre + scheme + sep + token + post,
        spaces,
        st.sampled_from(["Bearer", "bearer", "Basic", "Token", "", "Bearer:", "Bearer="]),
        st.sampled_from([" ", "", "  "]),
        token_like,
        spaces,
    ),
    short_text,
    long_text,
)


@st.composite
def authorization_values(draw: st.DrawFn) -> str:
    """Half of them right, the rest near misses and junk (one_of would weigh them by
    how many branches each has)."""
    kind = draw(st.sampled_from(["good", "good", "near miss", "junk"]))
    if kind == "good":
        return draw(good_authorization)
    return draw(other_authorization if kind == "near miss" else st.one_of(short_text, long_text))


legal_names = st.one_of(
    st.sampled_from(
        [
            "x-api-key",
            "cookie",
            "proxy-authorization",
            "authorization-token",
            "grpc-foo",
            "user-agent",
            "x-forwarded-for",
            "x-real-ip",
            "x-request-id",
            "te",
            "content-type",
            "host",
            "grpc-accept-encoding",
            "grpc-encoding",
            "grpc-timeout",
            "grpc-status",
            "grpc-message",
        ]
    ),
    st.from_regex(r"[a-z0-9_.-]{1,40}", fullmatch=True),
).filter(lambda k: not k.endswith("-bin") and k != "authorization")
bin_names = st.one_of(
    st.sampled_from(["authorization-bin", "grpc-trace-bin", "x-token-bin"]),
    st.from_regex(r"[a-z0-9_.-]{1,20}", fullmatch=True).map(lambda k: k + "-bin"),
)
bin_values = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=1000, max_size=6 * 1024),
    any_unicode.map(lambda s: s.encode("utf-8", "surrogatepass")),
    token_ref.map(str.encode),
)
legal_headers = st.one_of(
    st.tuples(legal_names, st.one_of(short_text, short_text, long_text, token_like)),
    st.tuples(bin_names, bin_values),
)
# Metadata grpc-python refuses to send: illegal names, non-ASCII or control characters,
# text for a -bin key, bytes for a text key.
illegal_headers = st.one_of(
    st.tuples(
        st.one_of(
            st.sampled_from(["Authorization", "authorization ", ":authority", "x y", ""]),
            st.text(max_size=8),
        ),
        short_text,
    ),
    st.tuples(st.one_of(st.just("authorization"), legal_names), any_unicode),
    st.tuples(st.just("authorization"), st.builds(lambda u: "Bearer " + u, any_unicode)),
    st.tuples(bin_names, short_text),
    st.tuples(legal_names, st.binary(max_size=16)),
)
authorization_headers = st.one_of(
    # Exactly one (mostly), none, or several.
    st.tuples(st.tuples(st.just("authorization"), authorization_values())),
    st.tuples(st.tuples(st.just("authorization"), authorization_values())),
    st.tuples(st.tuples(st.just("authorization"), authorization_values())),
    st.just(()),
    st.lists(st.tuples(st.just("authorization"), authorization_values()), min_size=2, max_size=4),
).map(tuple)


@st.composite
def metadata_lists(draw: st.DrawFn) -> Metadata:
    entries = list(draw(authorization_headers))
    entries += draw(
        st.one_of(
            st.lists(legal_headers, max_size=4),
            st.lists(legal_headers, min_size=5, max_size=40),
            # Near and over the 16 KiB the server accepts.
            st.lists(st.tuples(legal_names, long_text), min_size=2, max_size=5),
        )
    )
    if draw(st.sampled_from([False, False, False, True])):  # now and then one grpc-python refuses
        entries.append(draw(illegal_headers))
    return tuple(draw(st.permutations(entries)))


LIST = "/broker.v1.ImageHostService/ListImageHosts"
CREATE = "/broker.v1.ImageHostService/CreateImageHost"
PROBES: dict[str, Message] = {
    LIST: pb.ListImageHostsRequest(page_size=2),
    "/broker.v1.ImageHostService/GetImageHost": pb.GetImageHostRequest(
        name="imageHosts/docker-hub"
    ),
    # Never succeeds (no URL): the store is left alone.
    CREATE: pb.CreateImageHostRequest(image_host_id="fuzz-md", image_host=pb.ImageHost()),
}


@given(method=st.sampled_from(sorted(PROBES)), metadata=metadata_lists())
@example(method=LIST, metadata=(("authorization", f"Bearer {ADMIN}"),))
@example(method=LIST, metadata=(("authorization", f"  bearer   {VIEWER}  "),))
@example(method=CREATE, metadata=(("authorization", f"Bearer {VIEWER}"),))
@example(method=LIST, metadata=(("authorization", f"Bearer {ADMIN}"),) * 2)
@example(method=LIST, metadata=(("authorization", "Bearer " + "a" * 8000),))
@example(method=LIST, metadata=(("authorization", f"Bearer {ADMIN}"), ("x-pad", "p" * 8000)))
@example(method=LIST, metadata=tuple((f"x-h{n}", "v" * 200) for n in range(90)))
@example(method=LIST, metadata=(("authorization-bin", ADMIN.encode()),))
@example(method=LIST, metadata=(("authorization", "Bearer é"),))
@example(method=LIST, metadata=(("Authorization", f"Bearer {ADMIN}"),))
@example(method=LIST, metadata=(("x-bin", "text for a binary header"),))
@_settings(600)
def test_any_metadata_gets_a_proper_status(fuzzed: Fuzzed, method: str, metadata: Metadata) -> None:
    answer = send(fuzzed, method, PROBES[method], metadata)
    check(fuzzed, method, metadata, answer)


# -- message fields together with authentication ------------------------------------

field_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
    st.sampled_from(
        [
            "",
            "imageHosts/docker-hub",
            "imageHosts/fuzz-a",
            "fuzz-a",
            "docker-hub",
            "fuzz-a.example.org",
            "https://robot:pw@fuzz.example.org",
            "robot",
            "*",
            "display_name",
            "access_token",
        ]
    ),
    st.builds(lambda c, n: c * n, st.sampled_from(list("a\x00é-")), st.integers(500, 9000)),
)
INT_RANGES = {
    descriptor_mod.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    descriptor_mod.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    descriptor_mod.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    descriptor_mod.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def field_values(descriptor: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Values for some fields of any request message (RPCs added later included)."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for item in descriptor.fields:
        if item.message_type is not None:
            if item.message_type.full_name.startswith("google.protobuf.") and not item.is_repeated:
                if item.message_type.full_name == "google.protobuf.FieldMask":
                    optional[item.name] = st.lists(field_text, max_size=4)
                continue
            if depth < 2 and not item.is_repeated:
                optional[item.name] = field_values(item.message_type, depth + 1)
        elif item.type == descriptor_mod.FieldDescriptor.TYPE_STRING:
            value = field_text
            optional[item.name] = st.lists(value, max_size=3) if item.is_repeated else value
        elif item.type in INT_RANGES:
            low, high = INT_RANGES[item.type]
            optional[item.name] = st.one_of(
                st.integers(low, high), st.sampled_from([0, 1, 2, 1000, 1001, -1])
            )
        elif item.type == descriptor_mod.FieldDescriptor.TYPE_BOOL:
            optional[item.name] = st.booleans()
    return st.fixed_dictionaries({}, optional=optional)


def build(message: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        item = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if item.message_type is not None and item.message_type.full_name.endswith("FieldMask"):
            target.paths.extend(value)
        elif isinstance(value, dict):
            build(target, value)
            if not value:
                target.SetInParent()
        elif isinstance(value, list):
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def _method_descriptor(path: str) -> Any:
    service, name = path.lstrip("/").rsplit("/", 1)
    return descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, dict[str, Any], Metadata]:
    method = draw(st.sampled_from(sorted(registered_methods())))
    values = draw(field_values(_method_descriptor(method).input_type))
    auth = draw(
        st.one_of(
            st.just((("authorization", f"Bearer {ADMIN}"),)),
            st.just((("authorization", f"Bearer {ADMIN}"),)),
            st.just((("authorization", f"Bearer {VIEWER}"),)),
            st.just(()),
            st.tuples(st.tuples(st.just("authorization"), authorization_values())),
        )
    )
    extra = draw(st.lists(legal_headers, max_size=3))
    return method, values, (*auth, *tuple(extra))


@given(case=calls())
@_settings(400)
def test_message_fields_with_authentication_get_proper_statuses(
    fuzzed: Fuzzed, case: tuple[str, dict[str, Any], Metadata]
) -> None:
    method, values, metadata = case
    request = build(GetMessageClass(_method_descriptor(method).input_type)(), values)
    answer = send(fuzzed, method, request, metadata)
    check(fuzzed, method, metadata, answer)


# -- what grpc-python will not send: grpcurl ------------------------------------------

raw_values = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00\r\n"), max_size=24),
    # Arbitrary bytes, carried through the environment as surrogate escapes.
    st.binary(min_size=1, max_size=24)
    .filter(lambda b: b"\x00" not in b and b"\n" not in b and b"\r" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape")),
)


@given(
    name=st.sampled_from(["authorization", "authorization", "x-api-key"]),
    prefix=st.sampled_from(["", "Bearer ", f"Bearer {ADMIN}"]),
    value=raw_values,
)
@example(name="authorization", prefix="Bearer ", value="é")
@example(name="authorization", prefix=f"Bearer {ADMIN}", value="\udcff")
@example(name="authorization", prefix=f"Bearer {ADMIN}", value="\u00a0")
@_settings(30)
def test_non_ascii_header_values_via_grpcurl(
    fuzzed: Fuzzed, tmp_path_factory: pytest.TempPathFactory, name: str, prefix: str, value: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUZZ_")}
    env["FUZZ_HEADER"] = fuzzed.render(prefix) + value
    try:
        done = subprocess.run(
            [
                str(GRPCURL),
                "-plaintext",
                "-expand-headers",
                "-rpc-header",
                f"{name}: ${{FUZZ_HEADER}}",
                "-d",
                "{}",
                fuzzed.process.address,
                LIST.lstrip("/"),
            ],
            cwd=tmp_path_factory.getbasetemp(),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="backslashreplace",
            timeout=CALL_TIMEOUT + 10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        done = None  # the exception would carry the environment: fail outside
    if done is None:
        pytest.fail("grpcurl did not finish")
    assert fuzzed.process.process.poll() is None, "the broker died"
    said = fuzzed.hide(f"grpcurl exited {done.returncode}: {done.stderr[:400]}")
    if done.returncode == 1:  # grpcurl (Go) refused to send the header
        event("refused by grpcurl")
        return
    code = done.returncode - STATUS_EXIT_BASE
    assert done.returncode == 0 or code in range(1, 17), said
    assert code not in (grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0]), said
    event(f"grpcurl exit {done.returncode}")


# -- a body that is not the request message, from anyone --------------------------

UNDECODABLE = (b"\x0a\x05ab", b"\xff\xff\xff")  # a truncated field; an invalid tag


@pytest.mark.parametrize("who", ["nobody", "a wrong token", ADMIN])
def test_undecodable_body_gets_a_proper_status(fuzzed: Fuzzed, who: str) -> None:
    """A body that does not parse is INVALID_ARGUMENT, never INTERNAL; and authentication
    still comes first, so a caller without credentials learns only UNAUTHENTICATED."""
    metadata: Metadata = {
        "nobody": (),
        "a wrong token": (("authorization", "Bearer cbt_not-a-token"),),
        ADMIN: (("authorization", f"Bearer {ADMIN}"),),
    }[who]
    expected = grpc.StatusCode.INVALID_ARGUMENT if who == ADMIN else grpc.StatusCode.UNAUTHENTICATED
    wrong = []
    for method in registered_methods():
        call = fuzzed.channel.unary_unary(method)  # bytes in, bytes out
        for body in UNDECODABLE:
            try:
                call(
                    body,
                    metadata=[(k, fuzzed.render_value(v)) for k, v in metadata],
                    timeout=CALL_TIMEOUT,
                )
            except grpc.RpcError as error:
                code = error.code()
            else:
                code = grpc.StatusCode.OK
            if code != expected:
                wrong.append(f"{method} {body!r}: {code.name}")
    assert fuzzed.process.process.poll() is None, "the broker died"
    assert not wrong, f"undecodable bodies, expected {expected.name}, got:\n" + "\n".join(wrong)


# -- after all that -----------------------------------------------------------------


def test_broker_still_alive_and_answering(fuzzed: Fuzzed) -> None:
    """Runs last in this module: the broker survived every fuzz example above."""
    assert fuzzed.process.process.poll() is None, "the broker died"
    health = health_pb2_grpc.HealthStub(fuzzed.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = image_hosts_pb2_grpc.ImageHostServiceStub(fuzzed.channel)
    listed = stub.ListImageHosts(
        pb.ListImageHostsRequest(), metadata=fuzzed.admin_metadata(), timeout=CALL_TIMEOUT
    )
    assert listed.image_hosts
    default = stub.GetDefaultImageHost(
        pb.GetDefaultImageHostRequest(), metadata=fuzzed.admin_metadata(), timeout=CALL_TIMEOUT
    )
    assert default.default
    log = fuzzed.process.text()
    assert not _INCIDENT.search(log), "the broker logged an internal error (see its output)"
    fuzzed.channel.close()
    assert fuzzed.process.stop() == 0
