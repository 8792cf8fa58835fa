"""Authentication and authorisation of every RPC, against one real broker process.

One module-scoped `credbroker serve` serves every test here; principals are
added to its principals file while it runs (it re-reads the file about once a
second), which also proves that changes need no restart.

The role matrix calls every RPC the server registers (`registered_methods()`,
so a new RPC joins the matrix on its own) as every role. What each role may
call comes from `README_ROLE_TABLE`, copied from the README's role table and
deliberately *not* from `broker.security.authz`: the test must be able to
disagree with the code.

Every bearer token the tests handle is registered with `Secrets`; outputs are
checked for them and failure messages say where a token showed up, never the
token. Tokens are `Token`s (redacted repr), helpers that handle secrets hide
their frames from tracebacks, and assertions never compare token values.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from broker.security.principals import PrincipalsFile, hash_token
from broker.server import registered_methods
from broker.v1 import image_hosts_pb2 as pb
from tests.support.auth_helpers import (
    Metadata,
    Outcome,
    Secrets,
    Token,
    audit_lines,
    audit_records,
    bearer,
    call_rpc,
    request_class,
    service_short_name,
    short_name,
    wait_until,
)
from tests.support.broker_process import BrokerProcess

pytestmark = pytest.mark.integration

CREDBROKER = Path(sysconfig.get_path("scripts")) / "credbroker"
CLI_TIMEOUT = 60.0
IMAGE_HOSTS = "/broker.v1.ImageHostService/"
PD = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
MISSING = "imageHosts/zzz-missing"

#: Copied from the README (section Security, the role table). A name is an RPC
#: method name; a name ending in "Service" grants every method of that service.
README_ROLE_TABLE: dict[str, frozenset[str]] = {
    "admin": frozenset({"*"}),
    "launcher": frozenset(
        {
            "ResolveCredentials",
            "PullImage",
            "GetImageHost",
            "ListImageHosts",
            "GetDefaultImageHost",
        }
    ),
    "provisioner": frozenset({"PullSecretService", "GetImageHost", "ListImageHosts"}),
    "viewer": frozenset({"GetImageHost", "ListImageHosts", "GetDefaultImageHost"}),
}

#: The matrix principals; admin last, so that denied calls meet intact resources.
MATRIX_PRINCIPALS: dict[str, tuple[str, ...]] = {
    "m-viewer": ("viewer",),
    "m-launcher": ("launcher",),
    "m-provisioner": ("provisioner",),
    "m-launcher-provisioner": ("launcher", "provisioner"),
    "m-admin": ("admin",),
}
#: Added with the matrix principals, changed later while the broker serves.
CHANGED_LATER: dict[str, tuple[str, ...]] = {"leaving": ("viewer",), "rotating": ("viewer",)}
METHODS = registered_methods()


def expected_allowed(roles: Sequence[str], method: str) -> bool:
    for role in roles:
        grants = README_ROLE_TABLE[role]
        if "*" in grants or short_name(method) in grants or service_short_name(method) in grants:
            return True
    return False


# -- the broker and a client ------------------------------------------------------------------


@dataclass
class Env:
    broker: BrokerProcess
    channel: grpc.Channel
    secrets: Secrets
    admin_token: Token
    tokens: dict[str, Token] = field(default_factory=dict)

    @property
    def principals_file(self) -> PrincipalsFile:
        return PrincipalsFile(self.broker.data_dir / "principals.json")

    def call(
        self,
        method: str,
        request: Message | None = None,
        *,
        token: str | None = None,
        metadata: Metadata | None = None,
    ) -> Outcome:
        __tracebackhide__ = True  # token and metadata are secrets
        if request is None:
            request = request_class(method)()
        if metadata is None:
            metadata = bearer(token) if token is not None else ()
        outcome = call_rpc(self.channel, method, request, metadata)
        # No error message may ever quote a token.
        self.secrets.assert_absent(outcome.message, f"the error message of {short_name(method)}")
        self.secrets.assert_absent(repr(outcome.metadata), "ErrorInfo metadata")
        return outcome

    def admin(self, method: str, request: Message | None = None) -> Outcome:
        __tracebackhide__ = True
        return self.call(method, request, token=self.admin_token)

    def admin_ok(self, method: str, request: Message | None = None) -> Any:
        __tracebackhide__ = True
        outcome = self.admin(method, request)
        assert outcome.code == grpc.StatusCode.OK, (
            f"admin {short_name(method)}: {outcome.describe()}"
        )
        return outcome.response

    def add_principal(
        self, name: str, roles: Sequence[str], image_hosts: Sequence[str] = ()
    ) -> Token:
        token = self.principals_file.add(name, roles, image_hosts=image_hosts)
        assert token is not None
        self.tokens[name] = secret = self.secrets.add(token)
        return secret

    def accepted(self, token: str) -> bool:
        __tracebackhide__ = True
        return self.call(IMAGE_HOSTS + "ListImageHosts", token=token).code != UNAUTH

    def wait_accepted(self, token: str, who: str) -> None:
        __tracebackhide__ = True
        wait_until(lambda: self.accepted(token), f"the broker to accept {who}'s token")

    def wait_refused(self, token: str, who: str) -> None:
        __tracebackhide__ = True
        wait_until(lambda: not self.accepted(token), f"the broker to refuse {who}'s token")

    def snapshot(self) -> tuple[Any, ...]:
        """Every image host (name, etag, default flag) and the default: what a change changes."""
        listing = self.admin_ok(
            IMAGE_HOSTS + "ListImageHosts", pb.ListImageHostsRequest(page_size=1000)
        )
        hosts = tuple((h.name, h.etag, h.default) for h in listing.image_hosts)
        default = self.admin(IMAGE_HOSTS + "GetDefaultImageHost")
        return hosts, default.response.name if default.response is not None else default.code

    def create_host(self, image_host_id: str, url: str) -> pb.ImageHost:
        return self.admin_ok(
            IMAGE_HOSTS + "CreateImageHost",
            pb.CreateImageHostRequest(
                image_host_id=image_host_id, image_host=pb.ImageHost(url=url)
            ),
        )

    def default_name(self) -> str:
        return str(self.admin_ok(IMAGE_HOSTS + "GetDefaultImageHost").name)

    def wait_audit(self, what: str, **expected: str) -> dict[str, Any]:
        __tracebackhide__ = True
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [
                r
                for r in audit_records(self.broker.text())
                if all(r.get(k) == v for k, v in expected.items())
            ]
            return bool(found)

        wait_until(seen, f"an audit line for {what}", timeout=5.0, interval=0.05)
        return found[-1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # A generous failed-login budget: several tests send wrong tokens on purpose.
    process = BrokerProcess(
        tmp_path_factory.mktemp("authz") / "data",
        args=["--auth-failure-burst", "100000", "--rate-limit", "1000"],
    )
    process.start()
    channel = grpc.insecure_channel(process.address)
    try:
        sensitive = Secrets()
        admin_token = sensitive.add(process.admin_token())
        yield Env(process, channel, sensitive, admin_token)
    finally:
        channel.close()
        process.stop()


@pytest.fixture(scope="module")
def matrix(env: Env) -> dict[str, Token]:
    """The matrix principals (name -> token) and the hosts the matrix acts on."""
    env.create_host("victim", "victim.matrix.example.org")
    env.create_host("victim-delete", "victim-delete.matrix.example.org")
    everyone = {**MATRIX_PRINCIPALS, **CHANGED_LATER}
    tokens = {name: env.add_principal(name, roles) for name, roles in everyone.items()}
    for name, token in tokens.items():
        env.wait_accepted(token, name)
    return tokens


def effective_request(method: str, principal: str) -> Message:
    """A well-formed request that would change or disclose something if it got through."""
    name = short_name(method) if method.startswith(IMAGE_HOSTS) else ""
    if name == "CreateImageHost":
        return pb.CreateImageHostRequest(
            image_host_id=f"made-by-{principal}",
            image_host=pb.ImageHost(url=f"{principal}.matrix.example.org"),
        )
    if name == "GetImageHost":
        return pb.GetImageHostRequest(name="imageHosts/victim")
    if name == "UpdateImageHost":
        request = pb.UpdateImageHostRequest(
            image_host=pb.ImageHost(name="imageHosts/victim", display_name=f"by {principal}")
        )
        request.update_mask.paths.append("display_name")
        return request
    if name == "DeleteImageHost":
        return pb.DeleteImageHostRequest(name="imageHosts/victim-delete")
    if name == "SetDefaultImageHost":
        return pb.SetDefaultImageHostRequest(name="imageHosts/victim", reason=f"by {principal}")
    # ListImageHosts, GetDefaultImageHost, and RPCs added later: the default request.
    return request_class(method)()


# -- the role x RPC matrix ---------------------------------------------------------------------


def test_matrix_covers_the_image_host_service() -> None:
    """The matrix is not vacuous: it holds at least every ImageHostService RPC."""
    expected = {
        IMAGE_HOSTS + m
        for m in (
            "CreateImageHost",
            "GetImageHost",
            "ListImageHosts",
            "UpdateImageHost",
            "DeleteImageHost",
            "SetDefaultImageHost",
            "GetDefaultImageHost",
        )
    }
    assert expected <= set(METHODS)
    assert len(METHODS) == len(set(METHODS))


CELLS = [(p, m) for p in MATRIX_PRINCIPALS for m in METHODS]


@pytest.mark.parametrize(
    ("principal", "method"), CELLS, ids=[f"{p}-{short_name(m)}" for p, m in CELLS]
)
def test_role_matrix(env: Env, matrix: dict[str, Token], principal: str, method: str) -> None:
    roles = MATRIX_PRINCIPALS[principal]
    before = env.snapshot()
    outcome = env.call(method, effective_request(method, principal), token=matrix[principal])
    if expected_allowed(roles, method):
        # OK or a domain error (NOT_FOUND, INVALID_ARGUMENT, ...), never a refusal or a crash.
        assert outcome.code not in (PD, UNAUTH, grpc.StatusCode.INTERNAL), (
            f"{principal} (roles {roles}) may call {short_name(method)} per the README, "
            f"got {outcome.describe()}"
        )
    else:
        assert (outcome.code, outcome.reason) == (PD, "METHOD_NOT_ALLOWED"), (
            f"{principal} (roles {roles}) may not call {short_name(method)}: "
            f"got {outcome.describe()}"
        )
        assert env.snapshot() == before, f"denied {short_name(method)} changed image hosts"


def _missing_host_request(method: str) -> Message | None:
    """A request about a host that does not exist (Create: about one that does)."""
    name = short_name(method) if method.startswith(IMAGE_HOSTS) else ""
    if name == "CreateImageHost":
        return pb.CreateImageHostRequest(
            image_host_id="victim", image_host=pb.ImageHost(url="again.matrix.example.org")
        )
    if name == "UpdateImageHost":
        request = pb.UpdateImageHostRequest(
            image_host=pb.ImageHost(name=MISSING, display_name="nobody")
        )
        request.update_mask.paths.append("display_name")
        return request
    if name == "SetDefaultImageHost":
        return pb.SetDefaultImageHostRequest(name=MISSING, reason="nobody")
    request = request_class(method)()
    fields = request.DESCRIPTOR.fields_by_name
    if "name" in fields and fields["name"].type == fields["name"].TYPE_STRING:
        setattr(request, "name", MISSING)  # noqa: B010 - generic over request types
        return request
    return None


EXISTENCE_CELLS = [
    (p, m)
    for p, roles in MATRIX_PRINCIPALS.items()
    for m in METHODS
    if not expected_allowed(roles, m) and _missing_host_request(m) is not None
]


@pytest.mark.parametrize(
    ("principal", "method"),
    EXISTENCE_CELLS,
    ids=[f"{p}-{short_name(m)}" for p, m in EXISTENCE_CELLS],
)
def test_permission_before_existence(
    env: Env, matrix: dict[str, Token], principal: str, method: str
) -> None:
    request = _missing_host_request(method)
    assert request is not None
    if method.startswith(IMAGE_HOSTS):
        # Control: for a caller who may, this request does reveal (non-)existence.
        control = env.admin(method, request)
        assert control.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS), (
            control.describe()
        )
    outcome = env.call(method, request, token=matrix[principal])
    assert (outcome.code, outcome.reason) == (PD, "METHOD_NOT_ALLOWED"), outcome.describe()


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=[short_name(m) for m in METHODS])
def test_no_credentials_is_unauthenticated(env: Env, method: str) -> None:
    outcome = env.call(method)
    assert (outcome.code, outcome.reason) == (UNAUTH, "CREDENTIALS_REQUIRED"), outcome.describe()


BAD_HEADERS = [
    "wrong-token",
    "basic-scheme",
    "bearer-without-token",
    "bearer-without-space",
    "token-without-scheme",
    "two-valid-headers",
    "valid-and-wrong-header",
    "overlong-token",
]


def _bad_metadata(variant: str, env: Env) -> Metadata:
    __tracebackhide__ = True
    valid = env.admin_token
    wrong = env.secrets.add("cbt_" + secrets.token_urlsafe(32))
    return {
        "wrong-token": bearer(wrong),
        "basic-scheme": (("authorization", "Basic x"),),
        "bearer-without-token": (("authorization", "Bearer"),),
        "bearer-without-space": (("authorization", "Bearer" + valid),),
        "token-without-scheme": (("authorization", valid),),
        "two-valid-headers": (*bearer(valid), *bearer(valid)),
        "valid-and-wrong-header": (*bearer(valid), *bearer(wrong)),
        "overlong-token": bearer(valid + "x" * 600),
    }[variant]


@pytest.mark.parametrize("variant", BAD_HEADERS)
@pytest.mark.parametrize(
    "method", [IMAGE_HOSTS + "ListImageHosts", IMAGE_HOSTS + "CreateImageHost"]
)
def test_bad_credentials_are_unauthenticated(env: Env, variant: str, method: str) -> None:
    before = env.snapshot()
    request = (
        pb.CreateImageHostRequest(
            image_host_id="made-with-bad-credentials",
            image_host=pb.ImageHost(url="bad-credentials.example.org"),
        )
        if method.endswith("CreateImageHost")
        else None
    )
    outcome = env.call(method, request, metadata=_bad_metadata(variant, env))
    assert outcome.code == UNAUTH, f"{variant}: {outcome.describe()}"
    assert outcome.reason, "UNAUTHENTICATED without an ErrorInfo reason"
    assert env.snapshot() == before


def test_health_needs_no_credentials(env: Env) -> None:
    stub = health_pb2_grpc.HealthStub(env.channel)
    for metadata in ((), (("authorization", "Basic nonsense"),)):
        answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    answer = stub.Check(
        health_pb2.HealthCheckRequest(service="broker.v1.ImageHostService"), timeout=10
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_no_credentials(env: Env) -> None:
    # A raw ServerReflectionInfo stream listing the services ...
    stub = reflection_pb2_grpc.ServerReflectionStub(env.channel)
    responses = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    assert len(responses) == 1
    listed = {s.name for s in responses[0].list_services_response.service}
    assert {"broker.v1.ImageHostService", "grpc.health.v1.Health"} <= listed
    # ... and the grpc_reflection client resolving a service's file descriptor.
    database = ProtoReflectionDescriptorDatabase(env.channel)
    assert "broker.v1.ImageHostService" in database.get_services()
    file = database.FindFileContainingSymbol("broker.v1.ImageHostService")
    assert file.package == "broker.v1"


# -- principals limited to image hosts ---------------------------------------------------------


@pytest.fixture(scope="module")
def scoped(env: Env) -> dict[str, Token]:
    env.create_host("a", "a.scope.example.org")
    env.create_host("b", "b.scope.example.org")
    tokens = {
        "scoped-launcher": env.add_principal("scoped-launcher", ["launcher"], ["a"]),
        "scoped-admin": env.add_principal("scoped-admin", ["admin"], ["a", "a2"]),
    }
    for name, token in tokens.items():
        env.wait_accepted(token, name)
    return tokens


def test_scoped_launcher_sees_only_its_host(env: Env, scoped: dict[str, Token]) -> None:
    token = scoped["scoped-launcher"]
    own = env.call(
        IMAGE_HOSTS + "GetImageHost", pb.GetImageHostRequest(name="imageHosts/a"), token=token
    )
    assert own.code == grpc.StatusCode.OK, own.describe()
    for name in ("imageHosts/b", "imageHosts/zzz"):
        other = env.call(
            IMAGE_HOSTS + "GetImageHost", pb.GetImageHostRequest(name=name), token=token
        )
        assert (other.code, other.reason) == (PD, "IMAGE_HOST_OUT_OF_SCOPE"), (
            f"{name}: {other.describe()}"
        )
    listing = env.call(IMAGE_HOSTS + "ListImageHosts", token=token)
    assert listing.code == grpc.StatusCode.OK, listing.describe()
    assert [h.name for h in listing.response.image_hosts] == ["imageHosts/a"]
    assert listing.response.next_page_token == ""


def test_scoped_launcher_is_not_shown_a_default_outside_its_scope(
    env: Env, scoped: dict[str, Token]
) -> None:
    """README: "any other host is PERMISSION_DENIED" - the default host included."""
    assert env.default_name() != "imageHosts/a"
    outcome = env.call(IMAGE_HOSTS + "GetDefaultImageHost", token=scoped["scoped-launcher"])
    shown = outcome.response.name if outcome.response is not None else None
    assert (outcome.code, outcome.reason) == (PD, "IMAGE_HOST_OUT_OF_SCOPE"), (
        f"a principal limited to imageHosts/a was shown {shown} ({outcome.describe()})"
    )


def _update_b(display_name: str, *paths: str) -> pb.UpdateImageHostRequest:
    request = pb.UpdateImageHostRequest(
        image_host=pb.ImageHost(name="imageHosts/b", display_name=display_name)
    )
    request.update_mask.paths.extend(paths)
    return request


SCOPED_ADMIN_ATTEMPTS: dict[str, tuple[str, Message]] = {
    "create-existing-b": (
        "CreateImageHost",
        pb.CreateImageHostRequest(image_host_id="b", image_host=pb.ImageHost(url="b2.example.org")),
    ),
    "create-new-c": (
        "CreateImageHost",
        pb.CreateImageHostRequest(image_host_id="c", image_host=pb.ImageHost(url="c.example.org")),
    ),
    "update-b": ("UpdateImageHost", _update_b("taken over", "display_name")),
    "delete-b": ("DeleteImageHost", pb.DeleteImageHostRequest(name="imageHosts/b")),
    "set-default-b": (
        "SetDefaultImageHost",
        pb.SetDefaultImageHostRequest(name="imageHosts/b", reason="scoped admin"),
    ),
    "get-b": ("GetImageHost", pb.GetImageHostRequest(name="imageHosts/b")),
}


@pytest.mark.parametrize("attempt", SCOPED_ADMIN_ATTEMPTS)
def test_scoped_admin_cannot_touch_other_hosts(
    env: Env, scoped: dict[str, Token], attempt: str
) -> None:
    method, request = SCOPED_ADMIN_ATTEMPTS[attempt]
    before = env.snapshot()
    outcome = env.call(IMAGE_HOSTS + method, request, token=scoped["scoped-admin"])
    assert (outcome.code, outcome.reason) == (PD, "IMAGE_HOST_OUT_OF_SCOPE"), outcome.describe()
    assert env.snapshot() == before


def test_scoped_admin_may_change_its_own_host(env: Env, scoped: dict[str, Token]) -> None:
    request = pb.UpdateImageHostRequest(
        image_host=pb.ImageHost(name="imageHosts/a", display_name="A (scoped admin)")
    )
    request.update_mask.paths.append("display_name")
    outcome = env.call(IMAGE_HOSTS + "UpdateImageHost", request, token=scoped["scoped-admin"])
    assert outcome.code == grpc.StatusCode.OK, outcome.describe()
    assert outcome.response.display_name == "A (scoped admin)"


SCOPE_BEFORE_VALIDATION: dict[str, tuple[str, Message]] = {
    "set-default-b-without-reason": (
        "SetDefaultImageHost",
        pb.SetDefaultImageHostRequest(name="imageHosts/b", reason=""),
    ),
    "update-b-with-unknown-mask": ("UpdateImageHost", _update_b("x", "no_such_field")),
}


@pytest.mark.parametrize("attempt", SCOPE_BEFORE_VALIDATION)
def test_scope_is_checked_before_the_request_is_validated(
    env: Env, scoped: dict[str, Token], attempt: str
) -> None:
    """README: "Permission is checked before anything else"."""
    method, request = SCOPE_BEFORE_VALIDATION[attempt]
    outcome = env.call(IMAGE_HOSTS + method, request, token=scoped["scoped-admin"])
    assert (outcome.code, outcome.reason) == (PD, "IMAGE_HOST_OUT_OF_SCOPE"), outcome.describe()


def test_scoped_admin_is_not_told_about_hosts_outside_its_scope(
    env: Env, scoped: dict[str, Token]
) -> None:
    """A registry already claimed by an out-of-scope host must not name that host."""
    request = pb.CreateImageHostRequest(
        image_host_id="a2", image_host=pb.ImageHost(url="b.scope.example.org")
    )
    outcome = env.call(IMAGE_HOSTS + "CreateImageHost", request, token=scoped["scoped-admin"])
    assert outcome.code == grpc.StatusCode.ALREADY_EXISTS, outcome.describe()
    told = [t for t in (outcome.message, *outcome.metadata.values()) if "imageHosts/b" in t]
    assert not told, (
        f"the answer names an out-of-scope host: {outcome.describe()} {outcome.metadata}"
    )


# -- principals file changes while serving -----------------------------------------------------


@pytest.fixture(scope="module")
def live_changes(env: Env, matrix: dict[str, Token]) -> dict[str, Token]:
    """While the broker serves, in one go: add `late-viewer`, remove `leaving`, rotate
    `rotating` (both were accepted before). Returns the tokens involved."""
    changed = {
        "leaving": matrix["leaving"],
        "rotating-old": matrix["rotating"],
        "late-viewer": env.add_principal("late-viewer", ["viewer"]),
    }
    env.principals_file.remove("leaving")
    changed["rotating-new"] = env.secrets.add(env.principals_file.rotate_token("rotating"))
    return changed


def test_principal_added_while_serving_can_call(env: Env, live_changes: dict[str, Token]) -> None:
    token = live_changes["late-viewer"]
    env.wait_accepted(token, "late-viewer")
    outcome = env.call(IMAGE_HOSTS + "ListImageHosts", token=token)
    assert outcome.code == grpc.StatusCode.OK, outcome.describe()


def test_removed_principal_token_stops_working(env: Env, live_changes: dict[str, Token]) -> None:
    token = live_changes["leaving"]
    env.wait_refused(token, "leaving")
    outcome = env.call(IMAGE_HOSTS + "ListImageHosts", token=token)
    assert (outcome.code, outcome.reason) == (UNAUTH, "INVALID_TOKEN"), outcome.describe()


def test_rotated_token_replaces_the_old_one(env: Env, live_changes: dict[str, Token]) -> None:
    env.wait_refused(live_changes["rotating-old"], "rotating (old token)")
    outcome = env.call(IMAGE_HOSTS + "ListImageHosts", token=live_changes["rotating-new"])
    assert outcome.code == grpc.StatusCode.OK, outcome.describe()


# -- the audit trail ---------------------------------------------------------------------------


def _assert_peer(record: dict[str, Any]) -> None:
    peer = str(record.get("peer", ""))
    assert peer.startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:")), record


def test_denied_call_is_audited(env: Env, matrix: dict[str, Token]) -> None:
    request = pb.CreateImageHostRequest(
        image_host_id="audit-denied", image_host=pb.ImageHost(url="audit-denied.example.org")
    )
    outcome = env.call(IMAGE_HOSTS + "CreateImageHost", request, token=matrix["m-viewer"])
    assert outcome.code == PD, outcome.describe()
    record = env.wait_audit("the denied CreateImageHost", resource="imageHosts/audit-denied")
    assert record["principal"] == "m-viewer"
    assert record["method"] == IMAGE_HOSTS + "CreateImageHost"
    assert (record["outcome"], record["code"]) == ("FAILED", "PERMISSION_DENIED")
    assert record.get("time")
    _assert_peer(record)


@pytest.mark.parametrize("credentials", ["none", "wrong-token"])
def test_unauthenticated_call_is_audited(env: Env, credentials: str) -> None:
    resource = f"imageHosts/audit-unauth-{credentials}"
    metadata = () if credentials == "none" else _bad_metadata("wrong-token", env)
    outcome = env.call(
        IMAGE_HOSTS + "GetImageHost", pb.GetImageHostRequest(name=resource), metadata=metadata
    )
    assert outcome.code == UNAUTH, outcome.describe()
    record = env.wait_audit(f"the unauthenticated call ({credentials})", resource=resource)
    assert record["principal"] == "-"
    assert record["method"] == IMAGE_HOSTS + "GetImageHost"
    assert (record["outcome"], record["code"]) == ("FAILED", "UNAUTHENTICATED")
    _assert_peer(record)


def test_successful_create_and_set_default_are_audited(env: Env) -> None:
    access_token = env.secrets.add("hunter2-" + secrets.token_hex(16))
    request = pb.CreateImageHostRequest(
        image_host_id="audit-created",
        image_host=pb.ImageHost(
            url="audit-created.example.org", username="robot", access_token=access_token
        ),
    )
    env.admin_ok(IMAGE_HOSTS + "CreateImageHost", request)
    record = env.wait_audit(
        "the successful CreateImageHost",
        resource="imageHosts/audit-created",
        method=IMAGE_HOSTS + "CreateImageHost",
    )
    assert record["principal"] == "admin"
    assert (record["outcome"], record["code"]) == ("OK", "OK")
    _assert_peer(record)

    previous = env.default_name()
    reason = f"audit test {secrets.token_hex(4)}"
    env.admin_ok(
        IMAGE_HOSTS + "SetDefaultImageHost",
        pb.SetDefaultImageHostRequest(name="imageHosts/audit-created", reason=reason),
    )
    try:
        record = env.wait_audit(
            "SetDefaultImageHost", method=IMAGE_HOSTS + "SetDefaultImageHost", reason=reason
        )
        assert record["resource"] == "imageHosts/audit-created"
        assert record["previous_default"] == previous
        assert (record["principal"], record["code"]) == ("admin", "OK")
    finally:
        env.admin_ok(
            IMAGE_HOSTS + "SetDefaultImageHost",
            pb.SetDefaultImageHostRequest(name=previous, reason="restore after the audit test"),
        )


# -- the admin created on first start ----------------------------------------------------------


def test_first_start_wrote_admin_token_privately(env: Env) -> None:
    path = env.broker.admin_token_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    principals_path = env.broker.data_dir / "principals.json"
    assert stat.S_IMODE(principals_path.stat().st_mode) == 0o600
    stored = principals_path.read_text()
    env.secrets.assert_absent(stored, "principals.json")
    hashed = hash_token(env.admin_token) in stored
    assert hashed, "principals.json does not hold the admin token's SHA-256"
    log = env.broker.text()
    assert str(path) in log, "the log does not say where the admin token is"
    assert "grpcurl" in log, "the log shows no grpcurl command"
    env.secrets.assert_absent(log, "the broker's log")


# -- `credbroker principals ...` ---------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:
        # stdout may be a token: never shown by pytest.
        return f"Run(returncode={self.returncode}, {len(self.stdout)} + {len(self.stderr)} chars)"


def run_principals(*args: str | Path, data_dir: Path | None = None) -> Run:
    """`credbroker principals [--data-dir D] ARGS` with no CREDBROKER_* environment."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    prefix: list[str | Path] = ["principals"]
    if data_dir is not None:
        prefix += ["--data-dir", data_dir]
    completed = subprocess.run(
        [CREDBROKER, *prefix, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=environment,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return Run(completed.returncode, completed.stdout, completed.stderr)


def _is_one_token(stdout: str) -> bool:
    __tracebackhide__ = True
    lines = stdout.splitlines()
    return len(lines) == 1 and lines[0].startswith("cbt_") and len(lines[0]) > 40


def _cli_token(env: Env, run: Run, what: str) -> Token:
    """The token `run` printed on stdout, registered as a secret before any check."""
    __tracebackhide__ = True
    token = env.secrets.add(run.stdout.strip())
    printed_one = _is_one_token(run.stdout)
    assert run.returncode == 0, f"{what} exited {run.returncode}: {env.secrets.redact(run.stderr)}"
    assert printed_one, f"{what}: stdout is not exactly one token"
    env.secrets.assert_absent(run.stderr, f"{what}'s stderr")
    return token


def test_cli_add_prints_the_token_once_and_it_works(env: Env) -> None:
    run = run_principals("add", "cli-viewer", "--role", "viewer", data_dir=env.broker.data_dir)
    token = _cli_token(env, run, "principals add")
    assert "cannot be shown again" in run.stderr
    stored = (env.broker.data_dir / "principals.json").read_text()
    env.secrets.assert_absent(stored, "principals.json")
    hashed = hash_token(token) in stored
    assert hashed, "principals.json does not hold the new token's SHA-256"
    env.wait_accepted(token, "cli-viewer")
    outcome = env.call(IMAGE_HOSTS + "CreateImageHost", token=token)
    assert (outcome.code, outcome.reason) == (PD, "METHOD_NOT_ALLOWED"), outcome.describe()


def test_cli_data_dir_after_the_action(env: Env, tmp_path: Path) -> None:
    """`credbroker principals add NAME ... --data-dir D`, the way operators type it."""
    run = run_principals("add", "late-flag", "--role", "viewer", "--data-dir", tmp_path)
    env.secrets.add(run.stdout.strip())
    env.secrets.assert_absent(run.stderr, "stderr")
    assert run.returncode == 0, run.stderr
    assert [p.name for p in PrincipalsFile(tmp_path / "principals.json").load()] == ["late-flag"]


def test_cli_token_file_and_rotate_and_remove(env: Env, tmp_path: Path) -> None:
    data_dir = env.broker.data_dir
    token_file = tmp_path / "cli-launcher.token"
    run = run_principals(
        "add", "cli-launcher", "--role", "launcher", "--token-file", token_file, data_dir=data_dir
    )
    token = env.secrets.add(token_file.read_text().strip()) if token_file.exists() else ""
    assert run.returncode == 0, env.secrets.redact(run.stderr)
    assert run.stdout == "", "--token-file printed something on stdout"
    env.secrets.assert_absent(run.stderr, "stderr of add --token-file")
    assert "token written to" in run.stderr
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    looks_right = _is_one_token(token + "\n")
    assert looks_right, "the token file does not hold one token"
    env.wait_accepted(token, "cli-launcher")

    rotated = run_principals("rotate-token", "cli-launcher", data_dir=data_dir)
    new = _cli_token(env, rotated, "principals rotate-token")
    env.wait_refused(token, "cli-launcher (old token)")
    assert env.call(IMAGE_HOSTS + "ListImageHosts", token=new).code == grpc.StatusCode.OK

    removed = run_principals("remove", "cli-launcher", data_dir=data_dir)
    assert (removed.returncode, removed.stdout) == (0, ""), removed.stderr
    env.wait_refused(new, "cli-launcher (removed)")
    listing = run_principals("list", "--json", data_dir=data_dir)
    assert "cli-launcher" not in {row["name"] for row in json.loads(listing.stdout)}


def test_cli_certificate_only_principal(tmp_path: Path) -> None:
    run = run_principals(
        "add",
        "node-7",
        "--role",
        "launcher",
        "--no-token",
        "--cert-identity",
        "cn:node-7",
        data_dir=tmp_path,
    )
    assert (run.returncode, run.stdout) == (0, ""), run.stderr
    (principal,) = PrincipalsFile(tmp_path / "principals.json").load()
    assert principal.certificate_identities == {"cn:node-7"}
    assert principal.token_hashes == ()


def test_cli_list_never_shows_tokens_or_hashes(env: Env, matrix: dict[str, Token]) -> None:
    data_dir = env.broker.data_dir
    hashes = [h for p in env.principals_file.load() for h in p.token_hashes]
    assert hashes
    table = run_principals("list", data_dir=data_dir)
    as_json = run_principals("list", "--json", data_dir=data_dir)
    for run, what in ((table, "list"), (as_json, "list --json")):
        assert run.returncode == 0, run.stderr
        env.secrets.assert_absent(run.stdout + run.stderr, f"the output of {what}")
        shown = sum(h in run.stdout or h[:16] in run.stdout for h in hashes)
        assert shown == 0, f"{what} shows {shown} token hash(es)"
    assert table.stdout.split()[:5] == ["NAME", "ROLES", "IMAGE", "HOSTS", "TOKENS"]
    rows = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert set(MATRIX_PRINCIPALS) | {"admin"} <= set(rows)
    assert rows["m-launcher-provisioner"]["roles"] == ["launcher", "provisioner"]
    assert rows["admin"]["tokens"] == 1
    for row in rows.values():
        assert set(row) == {"name", "roles", "image_hosts", "certificate_identities", "tokens"}


CLI_ERRORS: dict[str, tuple[tuple[str, ...], int, str]] = {
    "duplicate-name": (("add", "first", "--role", "viewer"), 1, "already exists"),
    "unknown-role": (("add", "x", "--role", "root"), 2, "invalid choice"),
    "bad-cert-identity": (
        ("add", "x", "--role", "launcher", "--no-token", "--cert-identity", "node-7"),
        1,
        "cn:NAME or uri:URI",
    ),
    "bad-name": (("add", "Bad Name", "--role", "viewer"), 1, "invalid"),
    "neither-token-nor-cert": (
        ("add", "x", "--role", "viewer", "--no-token"),
        1,
        "needs a token or a certificate identity",
    ),
    "remove-unknown": (("remove", "nobody"), 1, "does not exist"),
    "rotate-unknown": (("rotate-token", "nobody"), 1, "does not exist"),
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_refuses_bad_changes(env: Env, tmp_path: Path, case: str) -> None:
    args, returncode, message = CLI_ERRORS[case]
    env.secrets.add(str(PrincipalsFile(tmp_path / "principals.json").add("first", ["viewer"])))
    before = (tmp_path / "principals.json").read_bytes()
    run = run_principals(*args, data_dir=tmp_path)
    assert run.returncode == returncode, run.stderr
    assert message in run.stderr, run.stderr
    assert run.stdout == "", "a refused change printed something (a token?) on stdout"
    assert (tmp_path / "principals.json").read_bytes() == before, "the file changed"


def test_cli_add_with_existing_token_file_changes_nothing(env: Env, tmp_path: Path) -> None:
    """A token file that exists already is refused *before* the principal is added:
    otherwise the principal exists with a token nobody was given."""
    existing = tmp_path / "existing.token"
    existing.write_text("keep me\n")
    run = run_principals(
        "add", "orphan", "--role", "viewer", "--token-file", existing, data_dir=tmp_path
    )
    env.secrets.assert_absent(run.stdout + run.stderr, "the output of add")
    assert run.returncode != 0
    assert existing.read_text() == "keep me\n"
    names = [p.name for p in PrincipalsFile(tmp_path / "principals.json").load()]
    assert "orphan" not in names, "the principal was added although its token was lost"


def test_cli_rotate_with_existing_token_file_keeps_the_old_token(env: Env, tmp_path: Path) -> None:
    source = PrincipalsFile(tmp_path / "principals.json")
    old = env.secrets.add(str(source.add("keeper", ["viewer"])))
    existing = tmp_path / "existing.token"
    existing.write_text("keep me\n")
    run = run_principals("rotate-token", "keeper", "--token-file", existing, data_dir=tmp_path)
    env.secrets.assert_absent(run.stdout + run.stderr, "the output of rotate-token")
    assert run.returncode != 0
    assert existing.read_text() == "keep me\n"
    (keeper,) = source.load()
    still_valid = keeper.token_hashes == (hash_token(old),)
    assert still_valid, "the old token was revoked although the new one was never handed out"


# -- last: nothing leaked ----------------------------------------------------------------------


def test_no_token_in_audit_lines_or_log(env: Env) -> None:
    """Runs last in this module: every token used above, against everything printed."""
    text = env.broker.text()
    lines = audit_lines(text)
    assert lines, "no audit line at all"
    for number, line in enumerate(lines):
        env.secrets.assert_absent(line, f"audit line {number}")
    env.secrets.assert_absent(text, "the broker's output")
