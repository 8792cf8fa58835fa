"""Property tests of ImageHostService against one real broker process.

Arbitrary field values (unicode, control characters, NUL, strings of up to
10,000 characters, empty strings, any int32 page size, random page tokens,
update-mask paths and etags) and arbitrary request bodies go to every RPC.
Whatever the input, the broker must:

- answer OK or with a deliberate status, never INTERNAL or UNKNOWN;
- attach a google.rpc.ErrorInfo to every error, and to INVALID_ARGUMENT a
  google.rpc.BadRequest whose violations name real request field paths;
- never return an access token, nor quote one in an error or a log line;
- refuse a malformed name, id, page size or missing image_host, naming the field;
- do what an OK answer claims (a created host reads back equal; an update
  changes exactly the masked fields and clears the token when the account
  changes; a deleted host is gone; a new default is the default);
- stay alive, with its invariants intact: exactly one default host, unique
  (registry, repository_prefix) pairs, a ListImageHosts that pages cleanly.

A state machine checks create/update/delete/set-default against a model of
the expected hosts, claims, default, etags and stored-token flags.

One broker serves the whole module (hypothesis calls each test many times), so
every property holds for whatever earlier tests left in the store.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import descriptor as descriptor_mod
from google.protobuf import field_mask_pb2, message_factory
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from broker.core.registry_url import parse_registry_url
from broker.v1 import image_hosts_pb2 as pb
from broker.v1 import image_hosts_pb2_grpc
from tests.support.broker_process import BrokerProcess

pytestmark = pytest.mark.integration

Stub = image_hosts_pb2_grpc.ImageHostServiceStub

RPC_TIMEOUT = 15.0
OK = grpc.StatusCode.OK
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SERVICE = pb.DESCRIPTOR.services_by_name["ImageHostService"]
ID_RE = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
REASON_RE = re.compile(r"[A-Z][A-Z0-9_]*[A-Z0-9]")  # AIP-193: UPPER_SNAKE_CASE
MUTABLE = ("display_name", "url", "username", "access_token")
# Every access token the tests send starts and ends with this mark; nothing else
# contains it (hypothesis mines string constants from broker/, never from tests/),
# and it is plain ASCII so that escaping (JSON logs, text format) cannot hide it.
# Finding it in an answer, an error or a log line means a token was disclosed.
SECRET_MARK = "zQ9tok3nQ9z"


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the broker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    # These tests are about field values, not load: lift the per-principal rate limit.
    process = BrokerProcess(
        tmp_path_factory.mktemp("properties") / "data", args=["--rate-limit", "1000000"]
    ).start()
    try:
        yield process
    finally:
        process.stop()


# -- checking one call -----------------------------------------------------------


def field_paths(message: descriptor_mod.Descriptor, prefix: str = "", depth: int = 0) -> set[str]:
    """Every field path of a request message (`image_host.url`, `update_mask.paths`...)."""
    paths: set[str] = set()
    for item in message.fields:
        path = prefix + item.name
        paths.add(path)
        if item.message_type is not None and depth < 3:
            paths |= field_paths(item.message_type, path + ".", depth + 1)
    return paths


def _details(status: status_pb2.Status, kind: Any) -> list[Any]:
    found = []
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            found.append(detail)
    return found


def check_error(
    error: grpc.RpcError,
    request_type: descriptor_mod.Descriptor,
    *,
    require_bad_request: bool = True,
) -> tuple[grpc.StatusCode, list[str]]:
    call: Any = error
    code: grpc.StatusCode = call.code()
    text = call.details() or ""
    where = f"{request_type.name} -> {code.name}: {text[:300]!r}"
    assert code not in NEVER, f"an unexpected failure reached the caller: {where}"
    try:
        status = rpc_status.from_call(call)
    except ValueError as exc:  # the status detail and the call disagree on the code
        raise AssertionError(f"status detail lost or garbled ({exc}): {where}") from None
    assert status is not None, f"no google.rpc.Status detail: {where}"
    infos = _details(status, error_details_pb2.ErrorInfo)
    assert len(infos) == 1, f"expected one ErrorInfo, got {len(infos)}: {where}"
    assert REASON_RE.fullmatch(infos[0].reason), f"bad ErrorInfo.reason {infos[0].reason!r}"
    assert infos[0].domain, f"ErrorInfo without a domain: {where}"
    violations = [
        v for bad in _details(status, error_details_pb2.BadRequest) for v in bad.field_violations
    ]
    if code == grpc.StatusCode.INVALID_ARGUMENT and require_bad_request:
        assert violations, f"INVALID_ARGUMENT without BadRequest field violations: {where}"
        real = field_paths(request_type)
        wrong = [v.field for v in violations if v.field not in real]
        assert not wrong, f"violations name fields {wrong} that {request_type.name} lacks"
    said = [text, status.message]
    for info in infos:
        said.extend(info.metadata.values())
    for bad in _details(status, error_details_pb2.BadRequest):
        said.extend(v.description for v in bad.field_violations)
    assert not any(SECRET_MARK in s for s in said), f"an error quotes an access token: {where}"
    return code, [v.field for v in violations]


def check_host(host: pb.ImageHost) -> None:
    assert host.access_token == "", f"{host.name} was returned with its access token"
    assert host.name.startswith("imageHosts/"), host.name
    assert ID_RE.fullmatch(host.name.removeprefix("imageHosts/")), host.name
    assert host.registry, f"{host.name} has no registry"
    assert host.registry == host.registry.lower(), f"{host.name}: registry {host.registry!r}"
    assert host.etag, f"{host.name} has no etag"
    assert host.username or not host.access_token_set, f"{host.name}: a token without a user"


def check_response(response: Message) -> None:
    assert SECRET_MARK not in str(response), f"an answer discloses an access token: {response}"
    if isinstance(response, pb.ImageHost):
        check_host(response)
    elif isinstance(response, pb.ListImageHostsResponse):
        for host in response.image_hosts:
            check_host(host)


@dataclass
class Outcome:
    code: grpc.StatusCode
    response: Any = None
    violations: tuple[str, ...] = ()


def call(method: Callable[..., Any], request: Message) -> Outcome:
    try:
        response = method(request, timeout=RPC_TIMEOUT)
    except grpc.RpcError as error:
        code, violations = check_error(error, request.DESCRIPTOR)
        return Outcome(code, violations=tuple(violations))
    check_response(response)
    return Outcome(OK, response)


# -- invariants of the whole store ----------------------------------------------


def list_all(stub: Stub, page_size: int = 1000) -> list[pb.ImageHost]:
    hosts: list[pb.ImageHost] = []
    token = ""
    for _ in range(10_000):
        outcome = call(
            stub.ListImageHosts, pb.ListImageHostsRequest(page_size=page_size, page_token=token)
        )
        assert outcome.code == OK, f"ListImageHosts failed with {outcome.code.name}"
        page = outcome.response
        assert len(page.image_hosts) <= min(page_size or 50, 1000)
        hosts.extend(page.image_hosts)
        token = page.next_page_token
        if not token:
            break
        assert page.image_hosts, "a page with a next_page_token but no hosts"
    names = [h.name for h in hosts]
    assert names == sorted(set(names)), "pages are not in strictly increasing id order"
    return hosts


def check_invariants(broker: BrokerProcess) -> list[pb.ImageHost]:
    assert broker.process.poll() is None, f"the broker died:\n{broker.text()[-5000:]}"
    stub = broker.image_hosts()
    hosts = list_all(stub)
    defaults = [h.name for h in hosts if h.default]
    assert len(defaults) == 1, f"exactly one default host expected, found {defaults}"
    current = call(stub.GetDefaultImageHost, pb.GetDefaultImageHostRequest())
    assert current.code == OK, f"GetDefaultImageHost failed with {current.code.name}"
    assert current.response.name == defaults[0]
    assert current.response.default
    claims = [(h.registry, h.repository_prefix) for h in hosts]
    duplicated = {c for c in claims if claims.count(c) > 1}
    assert not duplicated, f"(registry, repository_prefix) claimed twice: {duplicated}"
    return hosts


def final_checks(broker: BrokerProcess) -> None:
    """After a whole random sequence: alive, consistent, and no token in any output."""
    hosts = check_invariants(broker)
    for page_size in (1, 3, 0):
        assert list_all(broker.image_hosts(), page_size) == hosts, "paging changes the list"
    time.sleep(0.2)  # let the reader thread collect the last log and audit lines
    leaks = [line[:300] for line in broker.text().splitlines() if SECRET_MARK in line]
    assert not leaks, f"access tokens appear in the broker's logs or audit trail: {leaks}"


# -- strategies ------------------------------------------------------------------
#
# Every request field has a strategy of plausible values and one of arbitrary
# values. A request takes arbitrary values in none, one or two, or all of its
# fields: validation is probed field by field, and plausible requests still get
# past it to the etag, claim and default rules.


def _stretch(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


# Unicode, control characters, NUL, empty, and up to 10,000 characters.
any_text = st.one_of(
    st.just(""),
    st.text(max_size=30),
    st.text(
        alphabet=st.sampled_from("\x00\x01\x1b\x7f\t\n\r \u00a0\u200b\u2028\ufeff:/@a"), max_size=8
    ),
    st.builds(
        _stretch, st.text(min_size=1, max_size=20), st.integers(min_value=100, max_value=10_000)
    ),
)
words = st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=60)


@dataclass(frozen=True)
class Field:
    valid: st.SearchStrategy[Any]
    wild: st.SearchStrategy[Any]


@st.composite
def _values(draw: st.DrawFn, fields: dict[str, Field]) -> dict[str, Any]:
    every = sorted(fields)
    one = st.sampled_from(every).map(lambda name: frozenset({name}))
    some = st.frozensets(st.sampled_from(every), min_size=min(2, len(every)), max_size=3)
    none = st.just(frozenset[str]())
    wild = draw(st.one_of(none, none, one, one, some, st.just(frozenset(every))))
    return {
        name: draw(field.wild if name in wild else field.valid) for name, field in fields.items()
    }


POOL_IDS = ("p-a", "p-b", "p-c", "p-d", "p-e", "docker-hub")
valid_ids = st.one_of(
    st.sampled_from(POOL_IDS),
    st.sampled_from(POOL_IDS),
    st.sampled_from(POOL_IDS),
    st.from_regex(ID_RE, fullmatch=True),
)
wild_ids = st.one_of(
    any_text,
    st.sampled_from(["A", "a-", "-a", "1a", "a" * 64, "a_b", "p-a\n", "imageHosts/p-a"]),
)
ID = Field(valid_ids, wild_ids)
NAME = Field(
    valid_ids.map("imageHosts/{}".format),
    st.one_of(
        wild_ids.map("imageHosts/{}".format),
        any_text,
        st.sampled_from(["imageHosts/", "imageHosts/p-a/x", "x/imageHosts/p-a", "ImageHosts/p-a"]),
    ),
)
VALID_URLS = (
    "gcr.io",
    "ghcr.io/acme",
    "ghcr.io/acme/team",
    "registry.example.org:5000",
    "http://127.0.0.1:5000",
    "https://index.docker.io/v1/",
    "docker.io/library",
    "localhost:5000",
    "QUAY.IO",
    "http://[::1]:5000/x",
)
URL = Field(
    st.one_of(
        st.sampled_from(VALID_URLS),
        st.integers(min_value=0, max_value=10**6).map("https://r{}.example.org/team".format),
        st.from_regex(
            r"(https?://)?[a-z][a-z0-9]{0,8}\.[a-z]{2,3}(:[0-9]{1,5})?(/[a-z0-9]{1,5}){0,2}/?",
            fullmatch=True,
        ),
    ),
    st.one_of(
        any_text,
        st.sampled_from(
            ["http://", "ftp://gcr.io", "u:pw@gcr.io", "gcr.io?x", "[::1", "ubuntu", "a.io//b"]
        ),
    ),
)
DISPLAY_NAME = Field(
    st.one_of(st.just(""), st.sampled_from(["Acme", "Ünïcode ☃", "Team registry"]), words),
    any_text,
)
USERNAME = Field(
    st.one_of(st.just(""), st.sampled_from(["robot", "me@example.org"]), words),
    st.one_of(any_text, st.sampled_from(["a:b", " x", "x y", "x" * 257])),
)
# Every access token starts and ends with SECRET_MARK (see there).
ACCESS_TOKEN = Field(
    st.one_of(
        st.just(""),
        st.builds("{0}{1}{0}".format, st.just(SECRET_MARK), st.text(max_size=40)),
    ),
    st.builds(
        "{0}{1}{0}".format,
        st.just(SECRET_MARK),
        st.one_of(
            any_text,
            st.just("\x00"),
            st.builds(_stretch, st.text(min_size=1, max_size=20), st.integers(8_150, 8_250)),
        ),
    ),
)
CURRENT = "<the host's current etag>"  # replaced by the real etag just before the call
ETAG = Field(
    st.sampled_from(["", CURRENT, CURRENT]),
    st.one_of(st.from_regex(r"[0-9]{1,3}-[0-9a-f]{12}", fullmatch=True), any_text),
)
UPDATE_MASK = Field(
    st.one_of(
        st.none(),
        st.just(["*"]),
        st.lists(st.sampled_from(MUTABLE), min_size=1, max_size=4, unique=True),
    ),
    st.lists(
        st.one_of(
            st.sampled_from(
                [*MUTABLE, "*", "name", "etag", "registry", "default", "image_host.url", ""]
            ),
            any_text,
        ),
        max_size=4,
    ),
)
OUTPUT_ONLY = Field(
    st.just({}),
    st.fixed_dictionaries(
        {
            "registry": any_text,
            "repository_prefix": any_text,
            "plain_http": st.booleans(),
            "access_token_set": st.booleans(),
            "default": st.booleans(),
        }
    ),
)
PRESENT = Field(st.just(True), st.just(False))
REASON = Field(st.one_of(st.just("property test"), words), any_text)


def _page_token(after: object) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


PAGE_SIZE = Field(
    st.integers(min_value=0, max_value=1002),
    st.one_of(
        st.integers(min_value=-3, max_value=-1),
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
    ),
)
PAGE_TOKEN = Field(
    st.one_of(st.just(""), valid_ids.map(_page_token)),
    st.one_of(
        any_text,
        st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        st.one_of(wild_ids, st.integers(), st.none(), st.lists(st.integers())).map(_page_token),
        st.integers(min_value=1, max_value=10_000).map(
            lambda depth: base64.urlsafe_b64encode(b"[" * depth).decode()
        ),
    ),
)
HOST_FIELDS = {
    "display_name": DISPLAY_NAME,
    "url": URL,
    "username": USERNAME,
    "access_token": ACCESS_TOKEN,
    "output_only": OUTPUT_ONLY,
    "present": PRESENT,
}


@dataclass
class Step:
    """One RPC and its request; CURRENT as etag means the etag the host has when called."""

    rpc: str
    request: Message

    def __repr__(self) -> str:
        text = str(self.request).replace("\n", " ")
        return f"Step({self.rpc}, {text[:2000]!r})"


def _host(v: dict[str, Any]) -> pb.ImageHost:
    return pb.ImageHost(
        name=v.get("name", ""),
        display_name=v["display_name"],
        url=v["url"],
        username=v["username"],
        access_token=v["access_token"],
        etag=v.get("etag", ""),
        **v["output_only"],
    )


def _create(v: dict[str, Any]) -> Step:
    request = pb.CreateImageHostRequest(image_host_id=v["image_host_id"])
    if v["present"]:
        request.image_host.CopyFrom(_host(v))
    return Step("CreateImageHost", request)


def _update(v: dict[str, Any]) -> Step:
    request = pb.UpdateImageHostRequest()
    if v["present"]:
        request.image_host.CopyFrom(_host(v))
    if v["update_mask"] is not None:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=v["update_mask"]))
    return Step("UpdateImageHost", request)


create_steps = _values({"image_host_id": ID, **HOST_FIELDS}).map(_create)
get_steps = _values({"name": NAME}).map(lambda v: Step("GetImageHost", pb.GetImageHostRequest(**v)))
list_steps = _values({"page_size": PAGE_SIZE, "page_token": PAGE_TOKEN}).map(
    lambda v: Step("ListImageHosts", pb.ListImageHostsRequest(**v))
)
update_steps = _values({"name": NAME, "etag": ETAG, "update_mask": UPDATE_MASK, **HOST_FIELDS}).map(
    _update
)
delete_steps = _values({"name": NAME, "etag": ETAG}).map(
    lambda v: Step("DeleteImageHost", pb.DeleteImageHostRequest(**v))
)
set_default_steps = _values({"name": NAME, "reason": REASON, "etag": ETAG}).map(
    lambda v: Step("SetDefaultImageHost", pb.SetDefaultImageHostRequest(**v))
)
get_default_steps = st.just(Step("GetDefaultImageHost", pb.GetDefaultImageHostRequest()))
any_step = st.one_of(
    create_steps,
    get_steps,
    list_steps,
    update_steps,
    delete_steps,
    set_default_steps,
    get_default_steps,
)


# -- running a step ----------------------------------------------------------------


def _etag_holder(request: Message) -> Any:
    return request.image_host if isinstance(request, pb.UpdateImageHostRequest) else request


def run_step(stub: Stub, step: Step) -> Outcome:
    request = type(step.request)()
    request.CopyFrom(step.request)
    holder = _etag_holder(request)
    if getattr(holder, "etag", "") == CURRENT:
        current = call(stub.GetImageHost, pb.GetImageHostRequest(name=holder.name))
        holder.etag = current.response.etag if current.code == OK else ""
    before = None
    if isinstance(request, pb.UpdateImageHostRequest):
        found = call(stub.GetImageHost, pb.GetImageHostRequest(name=holder.name))
        before = found.response if found.code == OK else None
    outcome = call(getattr(stub, step.rpc), request)
    event(f"{step.rpc} -> {outcome.code.name}")
    _check_rejections(request, outcome)
    if outcome.code == OK:
        _check_success(stub, request, outcome.response, before)
    return outcome


def _is_name(name: str) -> bool:
    return name.startswith("imageHosts/") and bool(ID_RE.fullmatch(name[len("imageHosts/") :]))


def _check_rejections(request: Message, outcome: Outcome) -> None:
    """Requests that break a rule of the API are refused, naming the field."""
    invalid = ""
    if isinstance(request, pb.CreateImageHostRequest):
        if not request.HasField("image_host"):
            invalid = "image_host"
        elif not ID_RE.fullmatch(request.image_host_id):
            invalid = "image_host_id"
    elif isinstance(request, pb.UpdateImageHostRequest):
        if not request.HasField("image_host"):
            invalid = "image_host"
        elif not _is_name(request.image_host.name):
            invalid = "image_host.name"
    elif isinstance(request, pb.ListImageHostsRequest):
        if request.page_size < 0:
            invalid = "page_size"
    elif isinstance(request, pb.GetDefaultImageHostRequest):
        pass
    elif not _is_name(request.name):  # Get, Delete, SetDefault
        invalid = "name"
    if invalid:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (
            f"{type(request).__name__} with a bad {invalid} got {outcome.code.name}"
        )
        assert invalid in outcome.violations, f"expected a violation of {invalid}"


def _effective_mask(request: pb.UpdateImageHostRequest) -> list[str]:
    paths = list(request.update_mask.paths)
    if paths == ["*"]:
        return list(MUTABLE)
    return paths or [f for f in MUTABLE if getattr(request.image_host, f)]


def _claim_of(host: pb.ImageHost) -> tuple[str, str]:
    return host.registry, host.repository_prefix


def _check_success(
    stub: Stub, request: Message, response: Any, before: pb.ImageHost | None
) -> None:
    """The broker did what an OK answer says it did."""
    if isinstance(request, pb.CreateImageHostRequest):
        host = request.image_host
        assert response.name == "imageHosts/" + request.image_host_id
        assert response.url == host.url
        assert response.username == host.username
        assert response.display_name == (host.display_name or request.image_host_id)
        assert response.access_token_set == bool(host.access_token)
        assert response.create_time == response.update_time
        stored = call(stub.GetImageHost, pb.GetImageHostRequest(name=response.name))
        assert stored.code == OK
        assert stored.response == response
    elif isinstance(request, pb.GetImageHostRequest):
        assert response.name == request.name
    elif isinstance(request, pb.ListImageHostsRequest):
        assert len(response.image_hosts) <= min(request.page_size or 50, 1000)
        names = [h.name for h in response.image_hosts]
        assert names == sorted(set(names))
    elif isinstance(request, pb.UpdateImageHostRequest):
        _check_update(request, response, before)
    elif isinstance(request, pb.DeleteImageHostRequest):
        gone = call(stub.GetImageHost, pb.GetImageHostRequest(name=request.name))
        assert gone.code == grpc.StatusCode.NOT_FOUND
    elif isinstance(request, pb.SetDefaultImageHostRequest):
        assert response.name == request.name
        assert response.default
        now = call(stub.GetDefaultImageHost, pb.GetDefaultImageHostRequest())
        assert now.code == OK
        assert now.response.name == request.name
    elif isinstance(request, pb.GetDefaultImageHostRequest):
        assert response.default


def _check_update(
    request: pb.UpdateImageHostRequest, response: pb.ImageHost, before: pb.ImageHost | None
) -> None:
    """Masked fields take the new values, the others keep theirs; the token rule holds."""
    assert before is not None, "an update of a host that did not exist succeeded"
    new = request.image_host
    mask = _effective_mask(request)
    assert response.name == new.name
    assert response.etag != before.etag, "a write kept the old etag"
    assert response.create_time == before.create_time
    assert response.default == before.default
    for name in ("url", "username"):
        expected = getattr(new if name in mask else before, name)
        assert getattr(response, name) == expected, f"{name} after update_mask {mask}"
    if "display_name" in mask:
        assert response.display_name == (new.display_name or new.name[len("imageHosts/") :])
    else:
        assert response.display_name == before.display_name
    if "access_token" in mask:
        token_set = bool(new.access_token)
    elif _claim_of(response) != _claim_of(before) or response.username != before.username:
        token_set = False  # the old secret belonged to the old account
    else:
        token_set = before.access_token_set
    assert response.access_token_set == token_set, f"access_token_set after mask {mask}"


def _run_property(
    broker: BrokerProcess,
    steps: st.SearchStrategy[Step],
    examples: int,
    explicit: Sequence[Step] = (),
) -> None:
    stub = broker.image_hosts()

    def each_call_is_answered_properly(step: Step) -> None:
        run_step(stub, step)
        check_invariants(broker)

    test = given(step=steps)(each_call_is_answered_properly)
    for step in explicit:
        test = example(step=step)(test)
    _settings(examples)(test)()
    final_checks(broker)


def _token_steps(image_host_id: str) -> list[Step]:
    """Create and update with tokens that break a rule: the error must not quote them."""
    tokens = [
        f"{SECRET_MARK}{'x' * 8200}{SECRET_MARK}",  # too long
        f"{SECRET_MARK}\x00{SECRET_MARK}",  # NUL
    ]
    host = {"url": f"{image_host_id}.example.org", "username": "robot"}
    steps = [
        Step(
            "CreateImageHost",
            pb.CreateImageHostRequest(
                image_host_id=image_host_id, image_host=pb.ImageHost(access_token=t, **host)
            ),
        )
        for t in tokens
    ]
    steps.append(  # a token needs a username
        Step(
            "CreateImageHost",
            pb.CreateImageHostRequest(
                image_host_id=image_host_id,
                image_host=pb.ImageHost(url=host["url"], access_token=SECRET_MARK * 2),
            ),
        )
    )
    steps += [
        Step(
            "UpdateImageHost",
            pb.UpdateImageHostRequest(
                image_host=pb.ImageHost(name=f"imageHosts/{image_host_id}", access_token=t),
                update_mask=field_mask_pb2.FieldMask(paths=["access_token"]),
            ),
        )
        for t in tokens
    ]
    return steps


# -- one property per RPC ----------------------------------------------------------


def test_create_image_host(shared_broker: BrokerProcess) -> None:
    _run_property(shared_broker, create_steps, 80, _token_steps("tok-create"))


def test_get_image_host(shared_broker: BrokerProcess) -> None:
    _run_property(shared_broker, get_steps, 50)


def test_list_image_hosts(shared_broker: BrokerProcess) -> None:
    _run_property(shared_broker, list_steps, 80)


def test_update_image_host(shared_broker: BrokerProcess) -> None:
    stub = shared_broker.image_hosts()
    target = pb.ImageHost(url="tok-update.example.org", username="robot")
    created = call(
        stub.CreateImageHost,
        pb.CreateImageHostRequest(image_host_id="tok-update", image_host=target),
    )
    assert created.code in (OK, grpc.StatusCode.ALREADY_EXISTS)
    _run_property(shared_broker, update_steps, 80, _token_steps("tok-update")[3:])


def test_delete_image_host(shared_broker: BrokerProcess) -> None:
    _run_property(shared_broker, delete_steps, 60)


def test_set_default_image_host(shared_broker: BrokerProcess) -> None:
    _run_property(shared_broker, set_default_steps, 60)


def test_get_default_image_host(shared_broker: BrokerProcess) -> None:
    _run_property(shared_broker, get_default_steps, 5)


def test_random_call_sequences(shared_broker: BrokerProcess) -> None:
    stub = shared_broker.image_hosts()

    @_settings(30)
    @given(st.lists(any_step, min_size=1, max_size=12))
    def sequences_keep_the_invariants(sequence: list[Step]) -> None:
        for step in sequence:
            run_step(stub, step)
        check_invariants(shared_broker)

    sequences_keep_the_invariants()
    final_checks(shared_broker)


# -- deterministic reproductions of what the properties found --------------------


def test_long_update_mask_path_gets_a_complete_status(shared_broker: BrokerProcess) -> None:
    """An unknown mask path is echoed in the error: 10k characters overflow the trailers."""
    request = pb.UpdateImageHostRequest(
        image_host=pb.ImageHost(name="imageHosts/docker-hub", display_name="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["x" * 10_000]),
    )
    outcome = call(shared_broker.image_hosts().UpdateImageHost, request)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    check_invariants(shared_broker)


def test_deeply_nested_page_token_is_invalid_argument(shared_broker: BrokerProcess) -> None:
    """A page token that decodes to deeply nested JSON is a bad token, not an incident."""
    token = base64.urlsafe_b64encode(b"[" * 5_000).decode()
    request = pb.ListImageHostsRequest(page_token=token)
    outcome = call(shared_broker.image_hosts().ListImageHosts, request)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    check_invariants(shared_broker)


# -- raw request bodies --------------------------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Method:
    name: str
    path: str
    request: Any
    response: Any


METHODS = tuple(
    Method(
        m.name,
        f"/{SERVICE.full_name}/{m.name}",
        message_factory.GetMessageClass(m.input_type),
        message_factory.GetMessageClass(m.output_type),
    )
    for m in SERVICE.methods
)
VALID_BODIES = tuple(
    message.SerializeToString()
    for message in (
        pb.GetImageHostRequest(name="imageHosts/docker-hub"),
        pb.ListImageHostsRequest(page_size=5, page_token="e30="),
        pb.CreateImageHostRequest(
            image_host_id="raw-a", image_host=pb.ImageHost(url="raw-a.example.org")
        ),
        pb.UpdateImageHostRequest(
            image_host=pb.ImageHost(name="imageHosts/raw-a", display_name="Raw"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        pb.DeleteImageHostRequest(name="imageHosts/raw-a", etag="1-000000000000"),
        pb.SetDefaultImageHostRequest(name="imageHosts/raw-a", reason="raw"),
    )
)


def _splice(body: bytes, position: int, cut: int, insert: bytes) -> bytes:
    at = position % (len(body) + 1)
    return body[:at] + insert + body[at + cut :]


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=1_000, max_size=10_000),
    st.sampled_from(VALID_BODIES),
    st.builds(
        _splice,
        st.sampled_from(VALID_BODIES),
        st.integers(min_value=0, max_value=200),
        st.integers(min_value=0, max_value=4),
        st.binary(max_size=8),
    ),
)


def _decodes(method: Method, body: bytes) -> bool:
    try:
        method.request.FromString(body)
    except DecodeError:
        return False
    return True


@dataclass
class RawCase:
    method: Method
    body: bytes

    def __repr__(self) -> str:
        return f"RawCase({self.method.name}, {self.body[:200]!r}, {len(self.body)} bytes)"


raw_cases = st.builds(RawCase, st.sampled_from(METHODS), raw_bodies)


def test_raw_request_bodies(shared_broker: BrokerProcess) -> None:
    channel = shared_broker.channel()

    @_settings(120)
    @given(raw_cases)
    @example(RawCase(METHODS[0], b"\xff\xff"))
    @example(RawCase(METHODS[1], b"\x0a\x02\xff\xfe"))
    @example(RawCase(METHODS[2], b""))
    def raw_bodies_get_proper_statuses(case: RawCase) -> None:
        rpc = channel.unary_unary(
            case.method.path, request_serializer=_identity, response_deserializer=_identity
        )
        decodes = _decodes(case.method, case.body)
        try:
            answer = rpc(case.body, timeout=RPC_TIMEOUT)
        except grpc.RpcError as error:
            code, _ = check_error(
                error, case.method.request.DESCRIPTOR, require_bad_request=decodes
            )
            if not decodes:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (
                    f"an undecodable {case.method.name} body got {code.name}"
                )
        else:
            assert decodes, f"{case.method.name} accepted a body it cannot decode"
            check_response(case.method.response.FromString(answer))
        assert shared_broker.process.poll() is None, "the broker died"

    raw_bodies_get_proper_statuses()
    final_checks(shared_broker)


# -- a model of the expected state -------------------------------------------------


@dataclass
class ModelHost:
    claim: str
    username: str
    token_set: bool
    etag: str


MACHINE_IDS = ("sm-a", "sm-b", "sm-c", "sm-d")
# Several spellings of five claims, so that creates and updates both collide and
# find free claims (four ids can never hold all five).
MACHINE_URLS = (
    "sm-one.example.org",
    "https://SM-ONE.example.org/v2/",
    "http://sm-one.example.org",
    "sm-one.example.org/team",
    "sm-one.example.org/team/",
    "sm-two.example.org:5000",
    "sm-two.example.org:05000/",
    "http://[::1]:5001/sm",
    "localhost:5002",
)
STALE_ETAG = "0-000000000000"  # versions start at 1


def _claim(url: str) -> str:
    return parse_registry_url(url).claim


def _host_claim(host: pb.ImageHost) -> str:
    return f"{host.registry}/{host.repository_prefix}" if host.repository_prefix else host.registry


class ImageHostMachine(RuleBasedStateMachine):
    broker: ClassVar[BrokerProcess | None] = None

    def __init__(self) -> None:
        super().__init__()
        assert self.broker is not None
        self.stub = self.broker.image_hosts()
        self.hosts: dict[str, ModelHost] = {}
        self.default = ""

    def _etag(self, image_host_id: str, kind: str) -> str:
        if kind == "current" and image_host_id in self.hosts:
            return self.hosts[image_host_id].etag
        return STALE_ETAG if kind == "stale" else ""

    def _claim_owner(self, claim: str) -> str | None:
        return next((i for i, h in self.hosts.items() if h.claim == claim), None)

    @initialize()
    def load(self) -> None:
        for host in list_all(self.stub, page_size=1000):
            image_host_id = host.name.removeprefix("imageHosts/")
            self.hosts[image_host_id] = ModelHost(
                _host_claim(host), host.username, host.access_token_set, host.etag
            )
            if host.default:
                self.default = image_host_id

    @rule(
        image_host_id=st.sampled_from(MACHINE_IDS),
        url=st.sampled_from(MACHINE_URLS),
        with_token=st.booleans(),
    )
    def create(self, image_host_id: str, url: str, with_token: bool) -> None:
        token = f"{SECRET_MARK}{image_host_id}{SECRET_MARK}" if with_token else ""
        request = pb.CreateImageHostRequest(
            image_host_id=image_host_id,
            image_host=pb.ImageHost(
                url=url, username="robot" if with_token else "", access_token=token
            ),
        )
        outcome = call(self.stub.CreateImageHost, request)
        claim = _claim(url)
        if image_host_id in self.hosts or self._claim_owner(claim) is not None:
            assert outcome.code == grpc.StatusCode.ALREADY_EXISTS
            return
        assert outcome.code == OK
        assert _host_claim(outcome.response) == claim
        assert outcome.response.default == (not self.default)
        self.hosts[image_host_id] = ModelHost(
            claim, request.image_host.username, with_token, outcome.response.etag
        )
        self.default = self.default or image_host_id

    @rule(
        image_host_id=st.sampled_from(MACHINE_IDS),
        url=st.none() | st.sampled_from(MACHINE_URLS),
        username=st.none() | st.sampled_from(["", "robot", "other"]),
        token=st.none() | st.sampled_from(["", f"{SECRET_MARK}new{SECRET_MARK}"]),
        etag_kind=st.sampled_from(["none", "current", "stale"]),
    )
    def update(
        self,
        image_host_id: str,
        url: str | None,
        username: str | None,
        token: str | None,
        etag_kind: str,
    ) -> None:
        mask = [
            path
            for path, value in (("url", url), ("username", username), ("access_token", token))
            if value is not None
        ]
        host = pb.ImageHost(
            name="imageHosts/" + image_host_id,
            url=url or "",
            username=username or "",
            access_token=token or "",
            etag=self._etag(image_host_id, etag_kind),
        )
        request = pb.UpdateImageHostRequest(
            image_host=host, update_mask=field_mask_pb2.FieldMask(paths=mask)
        )
        outcome = call(self.stub.UpdateImageHost, request)

        current = self.hosts.get(image_host_id)
        if not mask:
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
            return
        if current is None:
            assert outcome.code == grpc.StatusCode.NOT_FOUND
            return
        if etag_kind == "stale":
            assert outcome.code == grpc.StatusCode.ABORTED
            return
        claim = _claim(url) if url is not None else current.claim
        new_username = username if username is not None else current.username
        if token is not None:
            token_set = bool(token)
        else:
            token_set = current.token_set and (claim, new_username) == (
                current.claim,
                current.username,
            )
        if token_set and not new_username:
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
            return
        owner = self._claim_owner(claim)
        if owner not in (None, image_host_id):
            assert outcome.code == grpc.StatusCode.ALREADY_EXISTS
            return
        assert outcome.code == OK, f"expected OK, got {outcome.code.name}"
        assert outcome.response.access_token_set == token_set
        assert outcome.response.etag != current.etag
        self.hosts[image_host_id] = ModelHost(claim, new_username, token_set, outcome.response.etag)

    @rule(
        image_host_id=st.sampled_from((*MACHINE_IDS, "docker-hub")),
        etag_kind=st.sampled_from(["none", "current", "stale"]),
    )
    def delete(self, image_host_id: str, etag_kind: str) -> None:
        request = pb.DeleteImageHostRequest(
            name="imageHosts/" + image_host_id, etag=self._etag(image_host_id, etag_kind)
        )
        outcome = call(self.stub.DeleteImageHost, request)
        if image_host_id not in self.hosts:
            assert outcome.code == grpc.StatusCode.NOT_FOUND
        elif etag_kind == "stale":
            assert outcome.code == grpc.StatusCode.ABORTED
        elif image_host_id == self.default:
            assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION
        else:
            assert outcome.code == OK, f"expected OK, got {outcome.code.name}"
            del self.hosts[image_host_id]

    @rule(
        image_host_id=st.sampled_from((*MACHINE_IDS, "docker-hub")),
        etag_kind=st.sampled_from(["none", "current", "stale"]),
    )
    def set_default(self, image_host_id: str, etag_kind: str) -> None:
        request = pb.SetDefaultImageHostRequest(
            name="imageHosts/" + image_host_id,
            reason="state machine",
            etag=self._etag(image_host_id, etag_kind),
        )
        outcome = call(self.stub.SetDefaultImageHost, request)
        if image_host_id not in self.hosts:
            assert outcome.code == grpc.StatusCode.NOT_FOUND
        elif etag_kind == "stale":
            assert outcome.code == grpc.StatusCode.ABORTED
        else:
            assert outcome.code == OK, f"expected OK, got {outcome.code.name}"
            assert outcome.response.etag == self.hosts[image_host_id].etag
            self.default = image_host_id

    @rule(image_host_id=st.sampled_from(MACHINE_IDS))
    def get(self, image_host_id: str) -> None:
        outcome = call(
            self.stub.GetImageHost, pb.GetImageHostRequest(name="imageHosts/" + image_host_id)
        )
        expected = self.hosts.get(image_host_id)
        if expected is None:
            assert outcome.code == grpc.StatusCode.NOT_FOUND
            return
        assert outcome.code == OK
        assert outcome.response.etag == expected.etag
        assert outcome.response.default == (image_host_id == self.default)

    @invariant()
    def store_matches_the_model(self) -> None:
        assert self.broker is not None
        hosts = check_invariants(self.broker)
        actual = {
            h.name.removeprefix("imageHosts/"): ModelHost(
                _host_claim(h), h.username, h.access_token_set, h.etag
            )
            for h in hosts
        }
        assert set(actual) == set(self.hosts)
        assert actual == self.hosts
        assert [h.name for h in hosts if h.default] == ["imageHosts/" + self.default]


def test_state_machine(shared_broker: BrokerProcess) -> None:
    ImageHostMachine.broker = shared_broker
    try:
        run_state_machine_as_test(
            ImageHostMachine,
            settings=settings(
                max_examples=25,
                stateful_step_count=20,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        ImageHostMachine.broker = None
    final_checks(shared_broker)
