"""No secret ever leaves the broker: not in an answer, an error, a log or an audit line.

Secrets here are (a) access tokens, whether sent where they belong
(`access_token`) or misplaced where they never belong (a URL's `user:token@`,
a `user:token` username, an authorization header, an over-long or
control-character field that is refused), and (b) the principals' bearer
tokens. Each is searched for verbatim, by its random tail, base64-encoded on
its own, and as base64 `user:token` (a Docker auth value) for every username
the test uses.

What may legitimately come back: a value the caller put into a non-secret
field that the broker accepted and stores (`display_name`, `username`) is
part of the resource and is echoed by successful answers. Such "planted"
values are distinct from every real secret; they may appear in successful
answers only, never in an error, a log line or an audit record. A value in a
field that is refused (a URL with credentials, a username containing ':') is
never stored, so it must never come back at all. Resource names and ids are
identifiers, echoed by design (NOT_FOUND messages, audit `resource`): no
secret is put there.

Every RPC the server registers (`broker.server.registered_methods()`, so RPCs
added later join automatically) is called through its generated stub and
through the real grpcurl binary, as every principal, anonymously and with
wrong tokens, with an empty request and with one whose secret-like fields
(`*token*`, `*secret*`, `*password*`, `*credential*`; a `*url` gets a
`https://robot:TOKEN@...` URL) carry fresh secrets; the
ImageHostService RPCs also run a scenario of successful and failing calls.
Failure messages name the secret by its index and where it appeared, never
its value.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import re
import secrets
import subprocess
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
from google.protobuf import descriptor as descriptor_mod
from google.protobuf import descriptor_pool, field_mask_pb2, json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.security import authz
from broker.security.principals import Principal, PrincipalsFile
from broker.server import registered_methods
from broker.v1 import image_hosts_pb2 as pb
from broker.v1 import image_hosts_pb2_grpc
from tests.support.broker_process import BrokerProcess

pytestmark = pytest.mark.integration

GRPCURL = Path(sysconfig.get_path("scripts")) / "grpcurl"
CALL_TIMEOUT = 20.0
RELOAD_POLLS = 60  # the server re-reads principals.json within ~1 s; 0.1 s apart
STATUS_EXIT_BASE = 64  # grpcurl exits 64 + the status code of a failed RPC
SERVICE = "/broker.v1.ImageHostService/"
NEVER = frozenset({"UNKNOWN", "INTERNAL"})
SECRET_WORDS = ("token", "secret", "password", "credential")
NOT_SECRET_FIELDS = frozenset({"page_token", "next_page_token"})
ENV_PREFIX = "CB_LEAK_HEADER_"
CONCURRENT_CALLS = 4
LEAK_BROKER_ARGS = ["--auth-failure-burst", "100000", "--rate-limit", "100000"]


# -- the secrets -------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    index: int
    kind: str
    value: str = field(repr=False)  # never in a failure message
    #: Put into a non-secret field of a call that succeeded: successful answers may echo it.
    echoable: bool = False


class Secrets:
    """Every secret of a run, the forms a leak could take, and redaction of all of them."""

    def __init__(self) -> None:
        self.values: list[Secret] = []
        self.usernames: set[str] = {"robot", "acme-bot", "acme-ci", "u"}

    def _add(self, kind: str, value: str, *, echoable: bool = False) -> str:
        self.values.append(Secret(len(self.values), kind, value, echoable))
        return value

    def access_token(self) -> str:
        # Upper case: a token misplaced into a URL path is never a valid repository prefix.
        return self._add("access token", f"LK{len(self.values):03d}X{secrets.token_hex(12)}")

    def bearer(self, principal: str, token: str) -> str:
        return self._add(f"bearer token of {principal}", token)

    def planted(self, where: str) -> str:
        """A value for a non-secret field of a call that succeeds: answers may echo it."""
        value = f"PL{len(self.values):03d}X{secrets.token_hex(12)}"
        return self._add(f"value planted in {where}", value, echoable=True)

    def forms(self, secret: Secret) -> list[tuple[str, str]]:
        value = secret.value
        found = [
            ("verbatim", value),
            ("its random tail", value[-20:]),
            ("base64", base64.b64encode(value.encode()).decode().rstrip("=")),
            ("hex", value.encode().hex()),
        ]
        for user in sorted(self.usernames):
            pair = f"{user}:{value}".encode()
            found.append((f"base64 {user}:token", base64.b64encode(pair).decode().rstrip("=")))
            found.append(
                (
                    f"urlsafe base64 {user}:token",
                    base64.urlsafe_b64encode(pair).decode().rstrip("="),
                )
            )
        return found

    def redact(self, text: str) -> str:
        needles = [(n, s.index) for s in self.values for _, n in self.forms(s)]
        for needle, index in sorted(needles, key=lambda item: len(item[0]), reverse=True):
            text = text.replace(needle, f"[secret #{index}]")
        return text

    def leaks(self, haystacks: Sequence[Haystack]) -> list[str]:
        # One joined text per kind of haystack first: searching thousands of small texts
        # one by one for thousands of needles would take many seconds.
        answers = "\n\x00\n".join(h.text for h in haystacks if h.echo_ok)
        others = "\n\x00\n".join(h.text for h in haystacks if not h.echo_ok)
        found = []
        for secret in self.values:
            for form, needle in self.forms(secret):
                if needle not in others and (secret.echoable or needle not in answers):
                    continue
                found += [
                    f"secret #{secret.index} ({secret.kind}, {form}) in {stack.where}"
                    for stack in haystacks
                    if needle in stack.text and not (secret.echoable and stack.echo_ok)
                ]
        return found


@dataclass(frozen=True)
class Haystack:
    where: str
    text: str = field(repr=False)  # may hold a leaked secret: never in a failure message
    #: A successful answer: it may echo planted (non-secret) values.
    echo_ok: bool = False


# -- who calls ---------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    label: str
    #: Values of the `authorization` headers sent (none, one, or several).
    authorization: tuple[str, ...] = field(default=(), repr=False)
    #: The principal it authenticates as, if any.
    principal: Principal | None = None


@dataclass
class Identities:
    admin: Identity
    viewer: Identity
    launcher: Identity
    provisioner: Identity
    scoped: Identity
    anonymous: Identity
    wrong: Identity
    access_token_as_bearer: Identity
    access_token_as_basic: Identity
    bare_access_token: Identity
    two_headers: Identity

    def every(self) -> list[Identity]:
        return list(vars(self).values())


PRINCIPALS = {
    "leak-viewer": (["viewer"], ()),
    "leak-launcher": (["launcher"], ()),
    "leak-provisioner": (["provisioner"], ()),
    "leak-scoped": (["launcher"], ("alpha-stub", "alpha-curl")),
}


def _wait_until_known(broker: BrokerProcess, token: str) -> None:
    """Principals are re-read within about a second: poll (bounded) until the token works."""
    __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
    with grpc.insecure_channel(broker.address) as channel:
        stub = image_hosts_pb2_grpc.ImageHostServiceStub(channel)
        for _ in range(RELOAD_POLLS):
            try:
                stub.ListImageHosts(
                    pb.ListImageHostsRequest(),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=CALL_TIMEOUT,
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                    return  # known (PERMISSION_DENIED is fine too)
                time.sleep(0.1)
            else:
                return
    pytest.fail("the broker did not pick up the new principals within the bound")


def make_identities(broker: BrokerProcess, keys: Secrets) -> Identities:
    admin_token = keys.bearer("admin", broker.admin_token())
    source = PrincipalsFile(broker.data_dir / "principals.json")
    made: dict[str, Identity] = {}
    token = ""
    for name, (roles, hosts) in PRINCIPALS.items():
        new = source.add(name, roles, image_hosts=hosts)
        assert new is not None
        token = keys.bearer(name, new)
        principal = Principal(name, frozenset(roles), frozenset(hosts))
        made[name] = Identity(name, (f"Bearer {token}",), principal)
    _wait_until_known(broker, token)
    # A real, stored access token, later sent as (or inside) a bearer token.
    leaked = keys.access_token()
    with grpc.insecure_channel(broker.address) as channel:
        image_hosts_pb2_grpc.ImageHostServiceStub(channel).CreateImageHost(
            pb.CreateImageHostRequest(
                image_host_id="seed",
                image_host=pb.ImageHost(
                    url="seed.example.org", username="robot", access_token=leaked
                ),
            ),
            metadata=[("authorization", f"Bearer {admin_token}")],
            timeout=CALL_TIMEOUT,
        )
    return Identities(
        admin=Identity(
            "admin", (f"Bearer {admin_token}",), Principal("admin", frozenset({"admin"}))
        ),
        viewer=made["leak-viewer"],
        launcher=made["leak-launcher"],
        provisioner=made["leak-provisioner"],
        scoped=made["leak-scoped"],
        anonymous=Identity("anonymous"),
        wrong=Identity("a wrong bearer token", (f"Bearer {keys.access_token()}",)),
        access_token_as_bearer=Identity(
            "a stored access token as bearer token", (f"Bearer {leaked}",)
        ),
        access_token_as_basic=Identity(
            "Basic robot:access-token",
            ("Basic " + base64.b64encode(f"robot:{leaked}".encode()).decode(),),
        ),
        bare_access_token=Identity("a bare stored access token", (leaked,)),
        two_headers=Identity(
            "two authorization headers", (f"Bearer {admin_token}", f"Bearer {leaked}")
        ),
    )


# -- the RPCs --------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    path: str
    name: str
    request: type[Message]
    response: type[Message]
    server_streaming: bool
    client_streaming: bool
    stub_class: Any

    @property
    def grpcurl_name(self) -> str:
        return self.path.lstrip("/")


def resolve(path: str) -> Rpc:
    service_name, method_name = path.lstrip("/").rsplit("/", 1)
    service = descriptor_pool.Default().FindServiceByName(service_name)
    method = service.methods_by_name[method_name]
    module_name = service.file.name.removesuffix(".proto").replace("/", ".") + "_pb2_grpc"
    stub_class = getattr(importlib.import_module(module_name), f"{service.name}Stub")
    return Rpc(
        path=path,
        name=method_name,
        request=GetMessageClass(method.input_type),
        response=GetMessageClass(method.output_type),
        server_streaming=method.server_streaming,
        client_streaming=method.client_streaming,
        stub_class=stub_class,
    )


def fill_secret_fields(message: Message, keys: Secrets, depth: int = 0) -> None:
    """Put fresh secrets into every field that looks like it holds one (also URLs)."""
    __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
    for item in message.DESCRIPTOR.fields:
        if item.is_repeated or item.containing_oneof is not None:
            continue
        if item.type == descriptor_mod.FieldDescriptor.TYPE_STRING:
            name = item.name
            if any(w in name for w in SECRET_WORDS) and name not in NOT_SECRET_FIELDS:
                setattr(message, name, keys.access_token())
            elif name.endswith(("url", "uri")):
                setattr(message, name, f"https://robot:{keys.access_token()}@x.example.org")
            elif name == "username":
                setattr(message, name, "robot")
        elif (
            item.type == descriptor_mod.FieldDescriptor.TYPE_MESSAGE
            and depth < 3
            and not item.message_type.full_name.startswith("google.protobuf.")
        ):
            fill_secret_fields(getattr(message, item.name), keys, depth + 1)


# -- outcomes ----------------------------------------------------------------------


@dataclass
class Outcome:
    label: str
    code: str
    reason: str = ""
    response: Message | None = field(default=None, repr=False)
    haystacks: list[Haystack] = field(default_factory=list)


def _metadata_text(metadata: Any) -> str:
    lines = []
    for key, value in metadata or ():
        shown = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        lines.append(f"{key}: {shown}")
    return "\n".join(lines)


def _unpacked_details(error: Any) -> tuple[str, list[str]]:
    try:
        status = rpc_status.from_call(error)
    except ValueError as exc:
        return "", [f"status detail disagrees with the call: {exc}"]
    if status is None:
        return "", []
    reason = ""
    texts = [str(status)]
    for packed in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                packed.Unpack(detail)
                texts.append(str(detail))
                if isinstance(detail, error_details_pb2.ErrorInfo):
                    reason = detail.reason
    return reason, texts


class Transport(Protocol):
    name: str

    def call(self, label: str, rpc: Rpc, request: Message, who: Identity) -> Outcome: ...


class StubTransport:
    """The generated stubs, with the authorization headers as call metadata."""

    name = "stub"

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel

    def call(self, label: str, rpc: Rpc, request: Message, who: Identity) -> Outcome:
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        where = f"stub {rpc.name} ({label}) as {who.label}"
        method = getattr(rpc.stub_class(self._channel), rpc.name)
        metadata = [("authorization", value) for value in who.authorization]
        argument: Any = iter([request]) if rpc.client_streaming else request
        try:
            if rpc.server_streaming:
                stream = method(argument, metadata=metadata, timeout=CALL_TIMEOUT)
                responses = [r for _, r in zip(range(1000), stream, strict=False)]
                stream.cancel()
                texts = [str(r) for r in responses]
                texts += [r.SerializeToString().decode("latin-1") for r in responses]
                texts += [_metadata_text(stream.initial_metadata())]
                texts += [_metadata_text(stream.trailing_metadata())]
                outcome = Outcome(label, "OK", response=responses[0] if responses else None)
            else:
                response, call = method.with_call(argument, metadata=metadata, timeout=CALL_TIMEOUT)
                texts = [
                    str(response),
                    response.SerializeToString().decode("latin-1"),
                    _metadata_text(call.initial_metadata()),
                    _metadata_text(call.trailing_metadata()),
                    str(call.details() or ""),
                ]
                outcome = Outcome(label, "OK", response=response)
            outcome.haystacks = [Haystack(f"{where}: answer", t, echo_ok=True) for t in texts]
            return outcome
        except grpc.RpcError as error:
            call_error: Any = error
            reason, details = _unpacked_details(call_error)
            texts = [
                str(call_error.details() or ""),
                str(call_error.debug_error_string() or ""),
                str(call_error),
                repr(call_error),
                _metadata_text(call_error.initial_metadata()),
                _metadata_text(call_error.trailing_metadata()),
                *details,
            ]
            return Outcome(
                label,
                call_error.code().name,
                reason,
                haystacks=[Haystack(f"{where}: error", t) for t in texts],
            )
        except (ValueError, TypeError) as exc:  # refused by the client library itself
            return Outcome(
                label, "CLIENT_ERROR", haystacks=[Haystack(f"{where}: exception", repr(exc))]
            )


def grpcurl_json(message: Message) -> dict[str, Any]:
    """Proto3 JSON, except FieldMask, which grpcurl 1.8.6 reads as {"paths": [...]}."""
    __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    for item, value in message.ListFields():
        if item.message_type is None or item.is_repeated:
            continue
        if item.message_type.full_name == field_mask_pb2.FieldMask.DESCRIPTOR.full_name:
            data[item.name] = {"paths": list(value.paths)}
        elif not item.message_type.full_name.startswith("google.protobuf."):
            data[item.name] = grpcurl_json(value)
    return data


_REASON = re.compile(r'"reason":\s*"([A-Z0-9_]+)"')
_EXIT_CODES = {STATUS_EXIT_BASE + c.value[0]: c.name for c in grpc.StatusCode}


class GrpcurlTransport:
    """The real grpcurl binary: request on stdin, headers from the environment (never argv)."""

    name = "grpcurl"

    def __init__(self, address: str, cwd: Path) -> None:
        self._address = address
        self._cwd = cwd
        self._env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}

    def run(
        self, label: str, target: str, data: str | None, authorization: Sequence[str]
    ) -> tuple[int, str, str]:
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        env = dict(self._env)
        argv = [str(GRPCURL), "-plaintext"]
        if authorization:
            argv.append("-expand-headers")
        for number, value in enumerate(authorization):
            env[f"{ENV_PREFIX}{number}"] = value
            argv += ["-rpc-header", f"authorization: ${{{ENV_PREFIX}{number}}}"]
        if data is not None:
            argv += ["-d", "@"]
        argv += [self._address, target]
        try:
            done = subprocess.run(
                argv,
                cwd=self._cwd,
                env=env,
                input=data or "",
                capture_output=True,
                text=True,
                errors="backslashreplace",  # keeps every ASCII secret findable
                timeout=CALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            done = None  # leave the except block: the exception carries our environment
        if done is None:
            pytest.fail(f"grpcurl {label} did not finish within {CALL_TIMEOUT} s")
        return done.returncode, done.stdout, done.stderr

    def call(self, label: str, rpc: Rpc, request: Message, who: Identity) -> Outcome:
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        where = f"grpcurl {rpc.name} ({label}) as {who.label}"
        returncode, stdout, stderr = self.run(
            where, rpc.grpcurl_name, json.dumps(grpcurl_json(request)), who.authorization
        )
        if returncode == 0:
            response = None
            if not rpc.server_streaming:
                response = json_format.Parse(stdout, rpc.response(), ignore_unknown_fields=True)
            return Outcome(
                label,
                "OK",
                response=response,
                haystacks=[
                    Haystack(f"{where}: stdout", stdout, echo_ok=True),
                    Haystack(f"{where}: stderr", stderr),
                ],
            )
        code = _EXIT_CODES.get(returncode, f"GRPCURL_EXIT_{returncode}")
        match = _REASON.search(stderr)
        return Outcome(
            label,
            code,
            match.group(1) if match else "",
            haystacks=[
                Haystack(f"{where}: stdout", stdout),
                Haystack(f"{where}: stderr", stderr),
            ],
        )


# -- driving the broker -----------------------------------------------------------


@dataclass
class Driver:
    transport: Transport
    keys: Secrets
    outcomes: list[Outcome] = field(default_factory=list)
    called: set[str] = field(default_factory=set)

    deferred: list[Callable[[], Outcome]] | None = None

    def call(
        self,
        label: str,
        rpc: Rpc | str,
        request: Message,
        who: Identity,
        expect: str | None = None,
        reason: str | None = None,
    ) -> Outcome | None:
        """Call and check; inside `concurrently()` the call is only queued (returns None)."""
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        if self.deferred is not None:

            def later() -> Outcome:
                __tracebackhide__ = True  # its closure carries secrets
                return self._call(label, rpc, request, who, expect, reason)

            self.deferred.append(later)
            return None
        return self._call(label, rpc, request, who, expect, reason)

    @contextlib.contextmanager
    def concurrently(self) -> Iterator[None]:
        """Queue the calls made inside, then run them a few at a time (they must not
        depend on each other: the refused calls of the scenario)."""
        self.deferred = []
        yield
        queued, self.deferred = self.deferred, None
        with ThreadPoolExecutor(max_workers=CONCURRENT_CALLS) as pool:
            for done in [pool.submit(thunk) for thunk in queued]:
                done.result()

    def _call(
        self,
        label: str,
        rpc: Rpc | str,
        request: Message,
        who: Identity,
        expect: str | None,
        reason: str | None,
    ) -> Outcome:
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        if isinstance(rpc, str):
            rpc = resolve(SERVICE + rpc)
        outcome = self.transport.call(label, rpc, request, who)
        self.outcomes.append(outcome)
        self.called.add(rpc.path)
        said = f"{self.transport.name} {rpc.name} ({label}) as {who.label}: {outcome.code}"
        # Redact before cutting: a cut could leave part of a secret unredacted.
        shown = self.keys.redact("\n".join(h.text for h in outcome.haystacks))[:3000]
        assert outcome.code not in NEVER, f"{said} {outcome.reason}\n{shown}"
        if expect is not None:
            assert outcome.code == expect, (
                f"{said}, expected {expect}; reason {outcome.reason}\n{shown}"
            )
        if reason is not None:
            assert outcome.reason == reason, f"{said}: reason {outcome.reason}, expected {reason}"
        return outcome

    def ok(self, label: str, rpc: str, request: Message, who: Identity) -> Any:
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        outcome = self._call(label, rpc, request, who, "OK", None)
        assert outcome.response is not None
        return outcome.response


def _host(**fields: str) -> pb.ImageHost:
    return pb.ImageHost(**fields)


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def image_host_scenario(d: Driver, who: Identities, tag: str, *, thorough: bool = True) -> None:
    """Successful and failing ImageHostService calls, most of them carrying secrets."""
    __tracebackhide__ = True  # its locals are secrets; each check names its call instead
    k = d.keys
    admin = who.admin
    alpha, beta, gamma = f"alpha-{tag}", f"beta-{tag}", f"gamma-{tag}"
    ra, rb = f"{tag}.alpha.example.org:5000", f"ghcr.io/{tag}"
    an, bn, gn = (f"imageHosts/{i}" for i in (alpha, beta, gamma))
    ma = f"imageHosts/missing-{tag}"
    INVALID, NOT_FOUND, EXISTS, ABORTED = (
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "ABORTED",
    )
    DENIED, UNAUTH = "PERMISSION_DENIED", "UNAUTHENTICATED"

    def create(
        label: str, host_id: str, host: pb.ImageHost, expect: str, as_: Identity = admin
    ) -> Any:
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        request = pb.CreateImageHostRequest(image_host_id=host_id, image_host=host)
        return d.call(label, "CreateImageHost", request, as_, expect)

    def update(
        label: str,
        host: pb.ImageHost,
        mask: Sequence[str] | None,
        expect: str,
        as_: Identity = admin,
    ) -> Any:
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        request = pb.UpdateImageHostRequest(image_host=host)
        if mask is not None:
            request.update_mask.CopyFrom(_mask(*mask))
        return d.call(label, "UpdateImageHost", request, as_, expect)

    # -- successful calls -----------------------------------------------------------
    a1 = create(
        "create alpha",
        alpha,
        _host(url=f"https://{ra}", username="robot", access_token=k.access_token()),
        "OK",
    ).response
    assert a1.access_token_set
    b1 = create(
        "create beta",
        beta,
        _host(url=rb, username="acme-bot", access_token=k.access_token()),
        "OK",
    ).response
    planted_user = k.planted("username")
    k.usernames.add(planted_user)
    g1 = create(
        "create gamma with planted display_name and username",
        gamma,
        _host(
            url=f"{tag}.gamma.example.org",
            display_name=k.planted("display_name"),
            username=planted_user,
            access_token=k.access_token(),
        ),
        "OK",
    ).response
    readers = [who.viewer, who.launcher, who.provisioner] if thorough else []
    for as_ in (admin, *readers, who.scoped):
        d.ok("get alpha", "GetImageHost", pb.GetImageHostRequest(name=an), as_)
    d.ok("get gamma", "GetImageHost", pb.GetImageHostRequest(name=gn), who.viewer)
    for as_ in (admin, *readers[:1], who.scoped):
        d.ok("list", "ListImageHosts", pb.ListImageHostsRequest(), as_)
    page = d.ok("list one", "ListImageHosts", pb.ListImageHostsRequest(page_size=1), admin)
    d.ok(
        "list next page",
        "ListImageHosts",
        pb.ListImageHostsRequest(page_size=1, page_token=page.next_page_token),
        admin,
    )
    a2 = update(
        "rotate alpha's token with its etag",
        _host(name=an, access_token=k.access_token(), etag=a1.etag),
        ["access_token"],
        "OK",
    ).response
    a3 = update(
        "relabel alpha, an unmasked token in the body",
        _host(name=an, display_name="Alpha", access_token=k.access_token()),
        ["display_name"],
        "OK",
    ).response
    assert a3.access_token_set
    update(
        "no mask: new username and token",
        _host(name=bn, username="acme-ci", access_token=k.access_token()),
        None,
        "OK",
    )
    b2 = update(
        "new username without token clears it",
        _host(name=bn, username="acme-bot"),
        ["username"],
        "OK",
    ).response
    assert not b2.access_token_set
    b3 = update(
        "give beta a token again",
        _host(name=bn, access_token=k.access_token()),
        ["access_token"],
        "OK",
    ).response
    d.ok(
        "set alpha default",
        "SetDefaultImageHost",
        pb.SetDefaultImageHostRequest(name=an, reason="leak check"),
        admin,
    )
    for as_ in (admin, *readers[:2]):
        d.ok("get default", "GetDefaultImageHost", pb.GetDefaultImageHostRequest(), as_)

    # -- refused URLs: an access token inside must never come back ---------------
    stored = k.access_token()  # also stored, then misplaced into URLs
    update("store a known token", _host(name=an, access_token=stored), ["access_token"], "OK")
    with d.concurrently():  # every call below is refused: none depends on another
        bad_urls = [
            ("userinfo with a stored token", f"https://robot:{stored}@{ra}"),
            ("userinfo, token only", f"https://{k.access_token()}@x.example.org"),
            ("userinfo without scheme", f"robot:{k.access_token()}@x.example.org"),
            ("userinfo, IPv6 host and path", f"http://robot:{k.access_token()}@[::1]:5000/team"),
            ("userinfo, ftp scheme", f"ftp://robot:{k.access_token()}@x.example.org"),
            ("userinfo with whitespace", f"https://robot:{k.access_token()} @x.example.org"),
            ("userinfo, too long", f"https://robot:{k.access_token()}@x.example.org/{'a' * 600}"),
            ("userinfo, bad port", f"https://robot:{k.access_token()}@x.example.org:99999"),
            ("token in the path", f"https://x.example.org/{k.access_token()}"),
            ("token in the query", f"https://x.example.org/?token={k.access_token()}"),
            ("token in the fragment", f"https://x.example.org#{k.access_token()}"),
            ("token as the port", f"https://x.example.org:{k.access_token()}"),
            ("token as a bare host", f"https://{k.access_token()}"),
            ("token with a slash in the password", f"https://u:{k.access_token()}/x@x.example.org"),
            ("token after a control character", f"https://x.example.org/\x01{k.access_token()}"),
        ]
        for label, url in bad_urls:
            create(
                f"url {label}",
                f"delta-{tag}",
                _host(url=url, username="robot", access_token=k.access_token()),
                INVALID,
            )
            if thorough:
                update(f"url {label}", _host(name=an, url=url), ["url"], INVALID)

        # -- other refused fields carrying tokens -------------------------------------
        create(
            "display_name too long",
            f"delta-{tag}",
            _host(url="x.example.org", display_name="x" * 100 + k.access_token()),
            INVALID,
        )
        create(
            "display_name with a control character",
            f"delta-{tag}",
            _host(url="x.example.org", display_name=k.access_token() + "\x07"),
            INVALID,
        )
        create(
            "username user:token",
            f"delta-{tag}",
            _host(url="x.example.org", username=f"robot:{k.access_token()}"),
            INVALID,
        )
        create(
            "username with a space",
            f"delta-{tag}",
            _host(url="x.example.org", username=f"robot {k.access_token()}"),
            INVALID,
        )
        create(
            "username too long",
            f"delta-{tag}",
            _host(url="x.example.org", username="u" * 250 + k.access_token()),
            INVALID,
        )
        create(
            "token with NUL",
            f"delta-{tag}",
            _host(url="x.example.org", username="u", access_token=k.access_token() + "\x00"),
            INVALID,
        )
        create(
            "token too long",
            f"delta-{tag}",
            _host(url="x.example.org", username="u", access_token=k.access_token() + "y" * 8200),
            INVALID,
        )
        create(
            "token without username",
            f"delta-{tag}",
            _host(url="x.example.org", access_token=k.access_token()),
            INVALID,
        )
        create(
            "bad id",
            "Bad_Id",
            _host(url="x.example.org", username="u", access_token=k.access_token()),
            INVALID,
        )
        create(
            "existing id",
            alpha,
            _host(url="x.example.org", username="u", access_token=k.access_token()),
            EXISTS,
        )
        create(
            "claimed registry",
            f"delta-{tag}",
            _host(url=f"HTTPS://{ra.upper()}/", username="u", access_token=k.access_token()),
            EXISTS,
        )
        d.call(
            "no image_host",
            "CreateImageHost",
            pb.CreateImageHostRequest(image_host_id=f"delta-{tag}"),
            admin,
            INVALID,
        )
        update(
            "stale etag",
            _host(name=an, access_token=k.access_token(), etag=a1.etag),
            ["access_token"],
            ABORTED,
        )
        update(
            "url of another host",
            _host(name=an, url=rb, access_token=k.access_token()),
            ["url", "access_token"],
            EXISTS,
        )
        update(
            "unknown mask path",
            _host(name=an, access_token=k.access_token()),
            ["password"],
            INVALID,
        )
        update(
            "missing host",
            _host(name=ma, access_token=k.access_token()),
            ["access_token"],
            NOT_FOUND,
        )
        update(
            "username user:token",
            _host(name=an, username=f"robot:{k.access_token()}"),
            ["username"],
            INVALID,
        )
        update(
            "bad name", _host(name=alpha, access_token=k.access_token()), ["access_token"], INVALID
        )
        d.call("no image_host", "UpdateImageHost", pb.UpdateImageHostRequest(), admin, INVALID)
        d.call("missing", "GetImageHost", pb.GetImageHostRequest(name=ma), admin, NOT_FOUND)
        d.call("bad name", "GetImageHost", pb.GetImageHostRequest(name=alpha), admin, INVALID)
        d.call("out of scope", "GetImageHost", pb.GetImageHostRequest(name=bn), who.scoped, DENIED)
        d.call(
            "missing, out of scope",
            "GetImageHost",
            pb.GetImageHostRequest(name=ma),
            who.scoped,
            DENIED,
        )
        d.call(
            "negative page size",
            "ListImageHosts",
            pb.ListImageHostsRequest(page_size=-1),
            admin,
            INVALID,
        )
        d.call(
            "a token as page token",
            "ListImageHosts",
            pb.ListImageHostsRequest(page_token=k.access_token()),
            admin,
            INVALID,
        )
        forged = base64.urlsafe_b64encode(json.dumps({"after": k.access_token()}).encode()).decode()
        d.call(
            "a page token naming a token",
            "ListImageHosts",
            pb.ListImageHostsRequest(page_token=forged),
            admin,
            INVALID,
        )
        d.call(
            "no reason",
            "SetDefaultImageHost",
            pb.SetDefaultImageHostRequest(name=bn),
            admin,
            INVALID,
        )
        d.call(
            "missing host",
            "SetDefaultImageHost",
            pb.SetDefaultImageHostRequest(name=ma, reason="r"),
            admin,
            NOT_FOUND,
        )
        d.call(
            "stale etag",
            "SetDefaultImageHost",
            pb.SetDefaultImageHostRequest(name=bn, reason="r", etag=b1.etag),
            admin,
            ABORTED,
        )
        d.call(
            "reason with a control character",
            "SetDefaultImageHost",
            pb.SetDefaultImageHostRequest(name=bn, reason=k.access_token() + "\x01"),
            admin,
            INVALID,
        )
        d.call(
            "reason too long",
            "SetDefaultImageHost",
            pb.SetDefaultImageHostRequest(name=bn, reason="r" * 600 + k.access_token()),
            admin,
            INVALID,
        )
        d.call(
            "the default",
            "DeleteImageHost",
            pb.DeleteImageHostRequest(name=an),
            admin,
            "FAILED_PRECONDITION",
        )
        d.call(
            "stale etag",
            "DeleteImageHost",
            pb.DeleteImageHostRequest(name=bn, etag=b1.etag),
            admin,
            ABORTED,
        )
        d.call("missing", "DeleteImageHost", pb.DeleteImageHostRequest(name=ma), admin, NOT_FOUND)

        # -- permission denied and unauthenticated, with tokens in the body ------------
        carrying = _host(url=f"https://{ra}", username="robot", access_token=k.access_token())
        create("viewer creates", f"delta-{tag}", carrying, DENIED, who.viewer)
        update(
            "launcher updates",
            _host(name=an, access_token=k.access_token()),
            ["access_token"],
            DENIED,
            who.launcher,
        )
        d.call(
            "provisioner sets default",
            "SetDefaultImageHost",
            pb.SetDefaultImageHostRequest(name=bn, reason="r"),
            who.provisioner,
            DENIED,
        )
        d.call(
            "viewer deletes",
            "DeleteImageHost",
            pb.DeleteImageHostRequest(name=bn),
            who.viewer,
            DENIED,
        )
        d.call(
            "provisioner gets default",
            "GetDefaultImageHost",
            pb.GetDefaultImageHostRequest(),
            who.provisioner,
            DENIED,
        )
        for as_, reason in (
            (who.anonymous, "CREDENTIALS_REQUIRED"),
            (who.wrong, "INVALID_TOKEN"),
            (who.access_token_as_bearer, "INVALID_TOKEN"),
            (who.access_token_as_basic, "INVALID_TOKEN"),
            (who.bare_access_token, "INVALID_TOKEN"),
            (who.two_headers, "BAD_CREDENTIALS"),
        ):
            d.call(
                "create carrying a token",
                "CreateImageHost",
                pb.CreateImageHostRequest(
                    image_host_id=f"delta-{tag}",
                    image_host=_host(
                        url=f"https://robot:{k.access_token()}@x.example.org",
                        access_token=k.access_token(),
                    ),
                ),
                as_,
                UNAUTH,
                reason,
            )
            update(
                "update carrying a token",
                _host(name=an, access_token=k.access_token()),
                ["access_token"],
                UNAUTH,
                as_,
            )

    # -- deletes -----------------------------------------------------------------
    d.ok("delete gamma", "DeleteImageHost", pb.DeleteImageHostRequest(name=gn, etag=g1.etag), admin)
    d.ok("delete beta", "DeleteImageHost", pb.DeleteImageHostRequest(name=bn, etag=b3.etag), admin)
    assert a2.etag != a1.etag
    after = d.ok("get alpha", "GetImageHost", pb.GetImageHostRequest(name=an), admin)
    assert after.access_token_set


Plan = Callable[[Rpc], list[tuple[str, Identity]]]


def everyone(who: Identities) -> Plan:
    """Both request shapes as every identity."""
    return lambda rpc: [(shape, as_) for shape in ("empty", "secret-filled") for as_ in who.every()]


def essentials(who: Identities, *, refused: bool = True) -> Plan:
    """Empty as admin, as a principal without permission and with a wrong token; then
    secret-filled as admin (grpcurl costs ~0.1 s a call, so not the whole matrix)."""

    def plan(rpc: Rpc) -> list[tuple[str, Identity]]:
        others = [who.viewer, who.launcher, who.provisioner, who.scoped]
        unauthorised = next(
            (p for p in others if p.principal and not authz.is_allowed(p.principal, rpc.path)),
            who.viewer,
        )
        steps = [("empty", who.admin), ("empty", who.access_token_as_bearer)]
        steps += [("empty", unauthorised)] if refused else []
        return [*steps, ("secret-filled", who.admin)]

    return plan


def every_rpc_matrix(d: Driver, plan: Plan) -> None:
    """Every registered RPC, empty and secret-filled, as the plan says (a few at a time)."""
    __tracebackhide__ = True  # its locals are secrets; each check names its call instead
    calls = []
    for path in registered_methods():
        rpc = resolve(path)
        filled = rpc.request()
        fill_secret_fields(filled, d.keys)
        requests = {"empty": rpc.request(), "secret-filled": filled}
        calls += [(rpc, requests[shape], shape, as_) for shape, as_ in plan(rpc)]

    def one(rpc: Rpc, request: Message, shape: str, as_: Identity) -> None:
        __tracebackhide__ = True  # its arguments carry secrets: keep the frame out of reports
        outcome = d.call(f"{shape} request", rpc, request, as_)
        said = f"{d.transport.name} {rpc.name} as {as_.label}: {outcome.code}"
        if as_.principal is None:
            assert outcome.code == "UNAUTHENTICATED", said
        elif not authz.is_allowed(as_.principal, rpc.path):
            assert outcome.code == "PERMISSION_DENIED", said
            assert outcome.reason == "METHOD_NOT_ALLOWED", said
        else:
            assert outcome.code not in ("UNAUTHENTICATED", "CLIENT_ERROR"), said

    with ThreadPoolExecutor(max_workers=CONCURRENT_CALLS) as pool:
        for done in [pool.submit(one, *call) for call in calls]:
            done.result()


# -- the tests ---------------------------------------------------------------------


def _audit_records(lines: Sequence[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.parametrize("audit_to", ["stderr", "file"])
def test_no_secret_leaks_from_any_rpc(tmp_path: Path, audit_to: str) -> None:
    audit_file = tmp_path / "audit.jsonl"
    args = list(LEAK_BROKER_ARGS)
    if audit_to == "file":
        args += ["--audit-log", str(audit_file)]
    keys = Secrets()
    broker = BrokerProcess(tmp_path / "data", args=args).start()
    drivers: list[Driver] = []
    try:
        who = make_identities(broker, keys)
        with grpc.insecure_channel(broker.address) as channel:
            stubs = Driver(StubTransport(channel), keys)
            curl = Driver(GrpcurlTransport(broker.address, tmp_path), keys)
            drivers = [stubs, curl]
            # grpcurl costs ~0.1 s a call: the full scenario once, the matrix in both runs.
            image_host_scenario(stubs, who, "stub")
            if audit_to == "stderr":
                image_host_scenario(curl, who, "curl", thorough=False)
            every_rpc_matrix(stubs, everyone(who))
            every_rpc_matrix(curl, essentials(who, refused=audit_to == "stderr"))
        assert broker.process.poll() is None, "the broker died"
    finally:
        returncode = broker.stop()
    assert returncode == 0

    every = set(registered_methods())
    for driver in drivers:
        missing = every - driver.called
        assert not missing, f"{driver.transport.name} never called {sorted(missing)}"
        assert not [o for o in driver.outcomes if o.code == "CLIENT_ERROR"]

    printed = broker.text().splitlines()
    haystacks = [h for driver in drivers for o in driver.outcomes for h in o.haystacks]
    haystacks += [Haystack(f"broker output line {n + 1}", line) for n, line in enumerate(printed)]
    if audit_to == "file":
        audit_lines = audit_file.read_text().splitlines()
        haystacks += [Haystack(f"audit file line {n + 1}", t) for n, t in enumerate(audit_lines)]
        assert not _audit_records(printed), "audit records went to stderr despite --audit-log"
    else:
        audit_lines = [line for line in printed if line.startswith("{")]
    haystacks.append(
        Haystack("the store file", (broker.data_dir / "store.enc").read_bytes().decode("latin-1"))
    )
    haystacks.append(Haystack("principals.json", (broker.data_dir / "principals.json").read_text()))

    # The haystacks are real: audit records of successes and refusals are there, and
    # a planted display_name does come back in successful answers (of both transports).
    records = _audit_records(audit_lines)
    codes = {r.get("code") for r in records}
    assert {"OK", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"} <= codes
    assert {"CreateImageHost", "UpdateImageHost", "SetDefaultImageHost", "DeleteImageHost"} <= {
        r.get("audit") for r in records
    }
    planted = [s.value for s in keys.values if s.echoable and "display_name" in s.kind]
    echoed = [h.where for h in haystacks if h.echo_ok and any(p in h.text for p in planted)]
    assert any(w.startswith("stub") for w in echoed)
    if audit_to == "stderr":
        assert any(w.startswith("grpcurl") for w in echoed)
    secret_count = len(keys.values)
    assert secret_count > 80

    leaks = keys.leaks(haystacks)
    assert not leaks, f"{len(leaks)} secret leak(s):\n" + "\n".join(leaks[:200])


def _send_undecodable_headers(broker: BrokerProcess, keys: Secrets, cwd: Path) -> list[Haystack]:
    __tracebackhide__ = True  # its locals are secrets
    who = make_identities(broker, keys)
    token = keys.access_token()
    with grpc.insecure_channel(broker.address) as channel:
        Driver(StubTransport(channel), keys).ok(
            "create",
            "CreateImageHost",
            pb.CreateImageHostRequest(
                image_host_id="latin",
                image_host=_host(url="latin.example.org", username="robot", access_token=token),
            ),
            who.admin,
        )
    curl = GrpcurlTransport(broker.address, cwd)
    viewer_token = who.viewer.authorization[0].removeprefix("Bearer ")
    outputs = []
    for label, value in (
        ("a valid bearer token and a stray Latin-1 byte", f"Bearer {viewer_token}\udce9"),
        ("an access token and a stray byte", f"Bearer {token}\udcff"),
        ("an access token as Basic, not UTF-8", f"Basic \udcff{token}"),
    ):
        code, stdout, stderr = curl.run(
            label, "broker.v1.ImageHostService/ListImageHosts", "{}", [value]
        )
        unauthenticated = STATUS_EXIT_BASE + grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert code == unauthenticated, f"{label}: grpcurl exited {code}"
        outputs += [Haystack(f"grpcurl ({label}) stdout", stdout)]
        outputs += [Haystack(f"grpcurl ({label}) stderr", stderr)]
    return outputs


def test_non_utf8_authorization_header_is_not_logged(tmp_path: Path) -> None:
    """A header value that is not UTF-8 (a token file saved as Latin-1, a stray byte)
    must not put the bearer or access token it carries into the broker's log.

    Only grpcurl can send such bytes (grpc-python refuses non-ASCII values); the
    environment carries them as surrogate escapes, which become the raw bytes.
    """
    keys = Secrets()
    broker = BrokerProcess(tmp_path / "data", args=LEAK_BROKER_ARGS).start()
    try:
        outputs = _send_undecodable_headers(broker, keys, tmp_path)
        assert broker.process.poll() is None, "the broker died"
    finally:
        broker.stop()
    printed = broker.text().splitlines()
    haystacks = outputs + [
        Haystack(f"broker output line {n + 1}", line) for n, line in enumerate(printed)
    ]
    leaks = keys.leaks(haystacks)
    assert not leaks, f"{len(leaks)} secret leak(s):\n" + "\n".join(leaks)
