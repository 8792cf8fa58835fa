"""The broker on the Vault store: policy, tokens and logins, outages, faults.

Each test isolates itself under a fresh prefix of the KV v2 mount. Against the
emulator (the normal run) everything runs; with VAULT_ADDR pointing at a real
Vault, the policy tests run there too (they only need the root token the run
was given), and the tests that need the emulator's own powers (expiring tokens,
AppRole and Kubernetes roles, sealing, faults, its clock) are skipped.

The token renewal thread of VaultStore waits in real time, while the emulator's
`advance()` only moves the emulator's clock: renewal is tested in real time
with a 3 s TTL, and `advance()` is used only to make tokens expire under a
broker (which then has to log in again).

Secret values are random and only ever compared through booleans, so that a
failure never prints them; Vault tokens are never printed either.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import hvac
import pytest

from broker.stores.base import (
    Check,
    Delete,
    Put,
    StoreError,
    StorePermissionDenied,
    StoreUnavailable,
)
from broker.stores.vault import AppRoleAuth, VaultAuth, VaultSettings, VaultStore
from broker.v1 import image_hosts_pb2 as pb
from broker.v1 import image_hosts_pb2_grpc
from tests.support.broker_process import BrokerProcess
from tests.support.status import CallError, expect_error
from tests.support.vault_emulator import VaultEmulator
from tests.support.vault_helpers import (
    NOT_SERVING,
    SERVING,
    STORE_HEALTH,
    full_token,
    health,
    policy_without,
    seed,
    token_store,
    token_with_policy,
    vault_broker,
    wait_until,
)
from tests.support.vault_target import VaultTarget

pytestmark = pytest.mark.integration

RPC_TIMEOUT = 10.0
NO_CACHE = ("--cache-ttl", "0", "--cache-stale-window", "0")
CACHE_TTL = 0.5
CACHED = ("--cache-ttl", str(CACHE_TTL), "--cache-stale-window", "60")
IMAGE_HOST_SERVICE = "broker.v1.ImageHostService"
HEALTH_TIMEOUT = 6.0  # the broker mirrors the store's state into health every second


class ExpectationFailed(AssertionError):
    """A failed check whose message is built with care (no secrets)."""


# -- helpers ---------------------------------------------------------------------


def emulator_of(vault: VaultTarget) -> VaultEmulator:
    if vault.emulator is None:
        pytest.skip("needs the emulator's fault injection; VAULT_ADDR points at a real Vault")
    return vault.emulator


def fake_secret() -> str:
    return "fake-" + secrets.token_hex(16)


def write_token_file(path: Path, token: str) -> None:
    """Replace the file atomically, as a Vault Agent sink does."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(token + "\n")
    temporary.chmod(0o600)
    os.replace(temporary, path)


def assert_undisclosed(text: str, *values: str) -> None:
    """None of `values` occurs in `text` (compared as booleans: nothing is printed)."""
    leaked = sum(value in text for value in values)
    assert leaked == 0, f"{leaked} secret value(s) disclosed"


def create(
    hosts: image_hosts_pb2_grpc.ImageHostServiceStub,
    host_id: str,
    url: str,
    username: str = "",
    access_token: str = "",
) -> pb.ImageHost:
    request = pb.CreateImageHostRequest(
        image_host_id=host_id,
        image_host=pb.ImageHost(url=url, username=username, access_token=access_token),
    )
    return hosts.CreateImageHost(request, timeout=RPC_TIMEOUT)


def get(hosts: image_hosts_pb2_grpc.ImageHostServiceStub, host_id: str) -> pb.ImageHost:
    request = pb.GetImageHostRequest(name=f"imageHosts/{host_id}")
    return hosts.GetImageHost(request, timeout=RPC_TIMEOUT)


def names(hosts: image_hosts_pb2_grpc.ImageHostServiceStub) -> list[str]:
    answer = hosts.ListImageHosts(pb.ListImageHostsRequest(), timeout=RPC_TIMEOUT)
    return [h.name for h in answer.image_hosts]


def rename(
    hosts: image_hosts_pb2_grpc.ImageHostServiceStub, host_id: str, display_name: str, etag: str
) -> pb.ImageHost:
    request = pb.UpdateImageHostRequest(
        image_host=pb.ImageHost(name=f"imageHosts/{host_id}", display_name=display_name, etag=etag)
    )
    request.update_mask.paths.append("display_name")
    return hosts.UpdateImageHost(request, timeout=RPC_TIMEOUT)


def delete(hosts: image_hosts_pb2_grpc.ImageHostServiceStub, host_id: str, etag: str = "") -> None:
    request = pb.DeleteImageHostRequest(name=f"imageHosts/{host_id}", etag=etag)
    hosts.DeleteImageHost(request, timeout=RPC_TIMEOUT)


def set_default(
    hosts: image_hosts_pb2_grpc.ImageHostServiceStub, host_id: str, etag: str = ""
) -> pb.ImageHost:
    request = pb.SetDefaultImageHostRequest(
        name=f"imageHosts/{host_id}", reason="tests moved the default", etag=etag
    )
    return hosts.SetDefaultImageHost(request, timeout=RPC_TIMEOUT)


def expect_unavailable(call: Callable[[], object], *secret_values: str) -> CallError:
    error = expect_error(call)
    assert_undisclosed(error.message, *secret_values)  # before anything prints the message
    assert error.code != grpc.StatusCode.INTERNAL, error.message
    assert error.code == grpc.StatusCode.UNAVAILABLE, (error.code, error.message)
    assert error.reason == "STORE_UNAVAILABLE", error.message
    return error


StartBroker = Callable[..., BrokerProcess]


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[StartBroker]:
    """Starts brokers on Vault (see vault_broker); every one is stopped after the test."""
    started: list[BrokerProcess] = []

    def start(
        vault: VaultTarget,
        prefix: str,
        *,
        token: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        name: str = "broker",
    ) -> BrokerProcess:
        process = vault_broker(tmp_path / name, vault, prefix, token=token, args=args, env=env)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


# -- the shipped policy ------------------------------------------------------------


def test_the_broker_works_with_exactly_the_shipped_policy(
    vault: VaultTarget, start_broker: StartBroker
) -> None:
    """deploy/vault/credbroker.hcl (moved to the test's prefix) is enough for every RPC."""
    prefix = vault.new_prefix()
    token = full_token(vault, prefix)
    broker = start_broker(vault, prefix, token=token, args=NO_CACHE)
    hosts = broker.image_hosts()
    secret = fake_secret()

    team = create(hosts, "team", "registry.example.com/team", "robot", secret)
    assert team.access_token_set
    assert get(hosts, "team").etag == team.etag
    assert names(hosts) == ["imageHosts/docker-hub", "imageHosts/team"]
    renamed = rename(hosts, "team", "The team", team.etag)
    assert renamed.display_name == "The team"
    assert renamed.etag != team.etag
    assert set_default(hosts, "team", renamed.etag).default
    assert hosts.GetDefaultImageHost(pb.GetDefaultImageHostRequest(), timeout=RPC_TIMEOUT).name == (
        "imageHosts/team"
    )

    spare = create(hosts, "spare", "registry.example.org")
    delete(hosts, "spare", spare.etag)
    assert expect_error(lambda: get(hosts, "spare")).code == grpc.StatusCode.NOT_FOUND
    again = create(hosts, "spare", "registry.example.org")  # a soft-deleted key, written again
    assert again.etag != spare.etag
    delete(hosts, "docker-hub")  # no longer the default
    assert names(hosts) == ["imageHosts/spare", "imageHosts/team"]

    # What Vault holds, read with the same policy.
    store = token_store(vault, prefix, token)
    try:
        stored = store.get("hosts/team")
        assert stored is not None
        assert stored.data["display_name"] == "The team"
        holds_the_secret = stored.data["access_token"] == secret
        assert holds_the_secret
        assert store.get("hosts/docker-hub") is None
        default = store.get("default")
        assert default is not None
        assert default.data["image_host_id"] == "team"
    finally:
        store.close()
    assert broker.process.poll() is None
    assert_undisclosed(broker.text(), secret, token)


# -- one capability less -------------------------------------------------------------


@dataclass(frozen=True)
class Denied:
    """A policy without `capability` on `secret/<kind>/...`, and the RPC that needs it."""

    kind: str
    capability: str
    rpc: str
    key: str  # the store key the denial is about (a prefix of it)


RPC_DENIALS = [
    pytest.param(Denied("data", "create", "create", "claims/"), id="create-on-data"),
    pytest.param(Denied("data", "update", "update", "hosts/existing"), id="update-on-data"),
    pytest.param(Denied("metadata", "read", "create", "claims/"), id="read-on-metadata"),
    pytest.param(Denied("delete", "update", "delete", "hosts/spare"), id="update-on-delete"),
]


@pytest.mark.parametrize("denied", RPC_DENIALS)
def test_a_missing_capability_fails_the_rpc_clearly(
    vault: VaultTarget, start_broker: StartBroker, denied: Denied
) -> None:
    """FAILED_PRECONDITION STORE_PERMISSION_DENIED naming the path and the capability;
    nothing is half written, the broker keeps serving, nothing secret is shown."""
    prefix = vault.new_prefix()
    secret = fake_secret()
    seed(
        vault,
        prefix,
        [
            ("existing", "registry.example.com", "robot", secret),
            ("spare", "registry.example.org", "", ""),
        ],
    )
    policy = policy_without(vault.policy_for_prefix(prefix), denied.kind, denied.capability)
    token = token_with_policy(vault, f"{prefix}-less", policy)
    broker = start_broker(vault, prefix, token=token, args=NO_CACHE)
    hosts = broker.image_hosts()
    existing = get(hosts, "existing")

    calls: dict[str, Callable[[], object]] = {
        "create": lambda: create(hosts, "new", "new.example.com", "robot", fake_secret()),
        "update": lambda: rename(hosts, "existing", "renamed", existing.etag),
        "delete": lambda: delete(hosts, "spare"),
    }
    error = expect_error(calls[denied.rpc])
    assert_undisclosed(error.message, secret, token)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION, (error.code, error.message)
    assert error.reason == "STORE_PERMISSION_DENIED", error.message
    assert "Vault denied the broker permission" in error.message, error.message
    assert f"{prefix}/{denied.key}" in error.message, error.message
    assert denied.capability in error.message, error.message
    if denied.kind != "data":
        assert f"{denied.kind}/" in error.message, error.message

    # Nothing changed, and the broker still answers what the policy allows.
    assert broker.process.poll() is None
    assert get(hosts, "existing").etag == existing.etag
    assert names(hosts) == ["imageHosts/docker-hub", "imageHosts/existing", "imageHosts/spare"]
    assert expect_error(lambda: get(hosts, "new")).code == grpc.StatusCode.NOT_FOUND
    assert_undisclosed(broker.text(), secret, token)


START_DENIALS = [
    pytest.param(Denied("data", "read", "start", "hosts/"), True, id="read-on-data"),
    pytest.param(Denied("metadata", "list", "start", "hosts"), True, id="list-on-metadata"),
    pytest.param(Denied("data", "create", "start", "hosts/"), False, id="create-on-data-unseeded"),
]


@pytest.mark.parametrize(("denied", "seeded"), START_DENIALS)
def test_a_missing_capability_needed_at_start_stops_the_broker_clearly(
    vault: VaultTarget, tmp_path: Path, denied: Denied, seeded: bool
) -> None:
    """Listing hosts and reading them (every start) or seeding (first start) needs the
    capability: the broker exits non-zero with 'cannot start' and the path."""
    prefix = vault.new_prefix()
    secret = fake_secret()
    if seeded:
        seed(vault, prefix, [("existing", "registry.example.com", "robot", secret)])
    policy = policy_without(vault.policy_for_prefix(prefix), denied.kind, denied.capability)
    token = token_with_policy(vault, f"{prefix}-less", policy)
    broker = vault_broker(tmp_path / "broker", vault, prefix, token=token, args=NO_CACHE)

    with pytest.raises(RuntimeError, match="broker exited"):
        broker.start()

    assert broker.process.returncode not in (0, None)
    output = broker.text()
    assert_undisclosed(output, secret, token)
    lines = [line for line in output.splitlines() if "cannot start" in line]
    assert len(lines) == 1, output
    assert "Vault denied the broker permission" in lines[0], lines[0]
    assert f"{prefix}/{denied.key}" in lines[0], lines[0]
    assert denied.capability in lines[0], lines[0]
    assert "Traceback" not in output, output
    if not seeded:  # the failed seeding left nothing behind
        store = token_store(vault, prefix, full_token(vault, prefix))
        try:
            assert store.list("") == []
        finally:
            store.close()


ACL_DENIALS = [
    pytest.param("data", "create", "hosts/new", id="create-on-data"),
    pytest.param("data", "update", "hosts/existing", id="update-on-data"),
    pytest.param("data", "read", "hosts/existing", id="read-on-data"),
    pytest.param("metadata", "list", "hosts", id="list-on-metadata"),
    pytest.param("metadata", "read", "hosts/existing", id="read-on-metadata"),
    pytest.param("delete", "update", "hosts/existing", id="update-on-delete"),
]


@pytest.mark.parametrize(("kind", "capability", "key"), ACL_DENIALS)
def test_a_denial_names_the_policy_path_and_the_one_missing_capability(
    vault: VaultTarget, kind: str, capability: str, key: str
) -> None:
    """What an operator must add to the policy: `path "secret/<kind>/<prefix>/..."` with
    `capability` (for a write: create for a new key, update for an existing one)."""
    prefix = vault.new_prefix()
    full = token_store(vault, prefix, full_token(vault, prefix))
    try:
        version = full.commit([Put("hosts/existing", {"n": 1}, 0)]).versions["hosts/existing"]
    finally:
        full.close()
    policy = policy_without(vault.policy_for_prefix(prefix), kind, capability)
    token = token_with_policy(vault, f"{prefix}-less", policy)
    store = token_store(vault, prefix, token)
    operations: dict[tuple[str, str], Callable[[], Any]] = {
        ("data", "create"): lambda: store.commit([Put("hosts/new", {"n": 1}, 0)]),
        ("data", "update"): lambda: store.commit([Put("hosts/existing", {"n": 2}, version)]),
        ("data", "read"): lambda: store.get("hosts/existing"),
        ("metadata", "list"): lambda: store.list("hosts/"),
        ("metadata", "read"): lambda: store.commit([Check("hosts/existing", version)]),
        ("delete", "update"): lambda: store.commit([Delete("hosts/existing", version)]),
    }
    try:
        with pytest.raises(StorePermissionDenied) as denial:
            operations[kind, capability]()
    finally:
        store.close()
    message = str(denial.value)
    assert_undisclosed(message, token)
    acl_path = f"{vault.mount}/{kind}/{prefix}/{key}"
    other = {"create": "update", "update": "create"}.get(capability) if kind == "data" else None
    if (
        acl_path not in message
        or not re.search(rf"\b{capability}\b", message)
        or (other is not None and re.search(rf"\b{other}\b", message))
    ):
        raise ExpectationFailed(f"expected {acl_path!r} and only {capability!r} in: {message}")


# -- tokens and logins ---------------------------------------------------------------


def test_a_token_file_is_read_again_when_vault_rejects_the_token(
    vault: VaultTarget, start_broker: StartBroker, tmp_path: Path
) -> None:
    """Vault Agent style: the agent writes a new token into the file; the broker re-reads
    it on the 403 'invalid token' and carries on. Until there is a good one: UNAVAILABLE."""
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    first = full_token(vault, prefix)
    token_file = tmp_path / "vault-token"
    write_token_file(token_file, first)
    broker = start_broker(
        vault,
        prefix,
        args=(*NO_CACHE, "--vault-token-file", str(token_file)),
        env={"VAULT_TOKEN": ""},
    )
    hosts = broker.image_hosts()
    created = create(hosts, "a", "registry.example.com")

    emulator.expire(first)
    second = full_token(vault, prefix)
    write_token_file(token_file, second)
    assert get(hosts, "a").etag == created.etag
    create(hosts, "b", "registry.example.org")
    assert "logging in again" in broker.text()

    emulator.expire(second)  # and the agent has not written a new one yet
    error = expect_unavailable(lambda: get(hosts, "a"), first, second)
    assert "Vault rejected the broker's" in error.message, error.message
    assert "even after logging in again" in error.message, error.message

    third = full_token(vault, prefix)
    write_token_file(token_file, third)
    assert names(hosts) == ["imageHosts/a", "imageHosts/b", "imageHosts/docker-hub"]
    assert broker.process.poll() is None
    assert_undisclosed(broker.text(), first, second, third)


def test_an_expired_plain_token_is_reported_as_unavailable(
    vault: VaultTarget, start_broker: StartBroker
) -> None:
    """VAULT_TOKEN cannot be replaced from inside: every call says why it fails."""
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    token = full_token(vault, prefix)
    broker = start_broker(vault, prefix, token=token, args=NO_CACHE)
    hosts = broker.image_hosts()
    create(hosts, "a", "registry.example.com")

    emulator.expire(token)
    for call in (
        lambda: get(hosts, "a"),
        lambda: names(hosts),
        lambda: create(hosts, "b", "registry.example.org"),
    ):
        error = expect_unavailable(call, token)
        assert "Vault rejected the broker's token" in error.message, error.message
        assert "expired or revoked" in error.message, error.message
    assert broker.process.poll() is None
    assert_undisclosed(broker.text(), token)


def test_the_rejected_token_message_reads_cleanly(vault: VaultTarget) -> None:
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    token = full_token(vault, prefix)
    store = token_store(vault, prefix, token)
    try:
        assert store.get("hosts/a") is None
        emulator.expire(token)
        with pytest.raises(StoreUnavailable) as rejected:
            store.get("hosts/a")
    finally:
        store.close()
    message = str(rejected.value)
    assert_undisclosed(message, token)
    assert "Vault rejected the broker's token" in message, message
    if "token token" in message:
        raise ExpectationFailed(message)


@dataclass
class RecordingAuth:
    """A VaultAuth that counts the logins of another one (and keeps their tokens)."""

    inner: VaultAuth
    description: str = "AppRole"
    tokens: list[str] = field(default_factory=list, repr=False)

    def login(self, client: hvac.Client) -> None:
        self.inner.login(client)
        self.tokens.append(str(client.token))

    def can_log_in_again(self) -> bool:
        return self.inner.can_log_in_again()


def test_approle_logs_in_again_after_its_token_is_revoked_or_expires(
    vault: VaultTarget, tmp_path: Path
) -> None:
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    emulator.put_policy(prefix, vault.policy_for_prefix(prefix))
    role = f"{prefix}-role"
    role_id, secret_id = emulator.add_approle(role, policies=[prefix], token_ttl=600)
    secret_id_file = tmp_path / "secret-id"
    secret_id_file.write_text(secret_id + "\n")
    auth = RecordingAuth(AppRoleAuth(role_id, secret_id_file))
    store = VaultStore(VaultSettings(url=vault.url, auth=auth, mount=vault.mount, prefix=prefix))
    try:
        version = store.commit([Put("hosts/a", {"n": 1}, 0)]).versions["hosts/a"]
        assert len(auth.tokens) == 1

        emulator.revoke(auth.tokens[-1])
        entry = store.get("hosts/a")
        assert entry is not None
        assert entry.version == version
        assert len(auth.tokens) == 2

        emulator.expire(auth.tokens[-1])
        store.commit([Put("hosts/a", {"n": 2}, version)])
        assert len(auth.tokens) == 3
        assert len(set(auth.tokens)) == 3  # three logins, three tokens

        # Without a valid secret id the next rejection is a clear store error.
        emulator.revoke_secret_id(role, secret_id)
        emulator.revoke(auth.tokens[-1])
        with pytest.raises(StoreError) as refused:
            store.get("hosts/a")
    finally:
        store.close()
    assert_undisclosed(str(refused.value), secret_id, *auth.tokens)
    assert "invalid role or secret ID" in str(refused.value)


def test_a_refused_login_names_the_login_path(vault: VaultTarget, tmp_path: Path) -> None:
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    emulator.put_policy(prefix, vault.policy_for_prefix(prefix))
    role = f"{prefix}-role"
    role_id, secret_id = emulator.add_approle(role, policies=[prefix])
    secret_id_file = tmp_path / "secret-id"
    secret_id_file.write_text(secret_id + "\n")
    auth = RecordingAuth(AppRoleAuth(role_id, secret_id_file))
    store = VaultStore(VaultSettings(url=vault.url, auth=auth, mount=vault.mount, prefix=prefix))
    try:
        emulator.revoke_secret_id(role, secret_id)
        emulator.revoke(auth.tokens[-1])
        with pytest.raises(StoreError) as refused:
            store.get("hosts/a")
    finally:
        store.close()
    message = str(refused.value)
    assert_undisclosed(message, secret_id, *auth.tokens)
    assert "invalid role or secret ID" in message, message
    if f"{vault.mount}/auth" in message or "AppRole" not in message:
        raise ExpectationFailed(message)


def test_approle_and_kubernetes_brokers_log_in_and_log_in_again_after_expiry(
    vault: VaultTarget, start_broker: StartBroker, tmp_path: Path
) -> None:
    """The --vault-auth approle/kubernetes flags; the emulator's clock then jumps past the
    tokens' TTL, and both brokers log in again by themselves on the next call."""
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    emulator.put_policy(prefix, vault.policy_for_prefix(prefix))
    role_id, secret_id = emulator.add_approle(f"{prefix}-app", policies=[prefix], token_ttl=60)
    secret_id_file = tmp_path / "secret-id"
    secret_id_file.write_text(secret_id + "\n")
    emulator.add_kubernetes_role(
        f"{prefix}-k8s",
        service_account="credbroker",
        namespace="platform",
        policies=[prefix],
        token_ttl=60,
    )
    jwt_file = tmp_path / "sa-token"
    jwt = emulator.kubernetes_jwt("credbroker", "platform")
    jwt_file.write_text(jwt)
    approle = start_broker(
        vault,
        prefix,
        args=(
            *NO_CACHE,
            "--vault-auth",
            "approle",
            "--vault-role-id",
            role_id,
            "--vault-secret-id-file",
            str(secret_id_file),
        ),
        env={"VAULT_TOKEN": ""},
        name="approle",
    )
    kubernetes = start_broker(
        vault,
        prefix,
        args=(
            *NO_CACHE,
            "--vault-auth",
            "kubernetes",
            "--vault-k8s-role",
            f"{prefix}-k8s",
            "--vault-k8s-jwt-file",
            str(jwt_file),
        ),
        env={"VAULT_TOKEN": ""},
        name="kubernetes",
    )
    by_approle = create(approle.image_hosts(), "by-approle", "registry.example.com")
    by_kubernetes = create(kubernetes.image_hosts(), "by-kubernetes", "registry.example.org")

    emulator.advance(61)  # both tokens are now expired
    assert get(approle.image_hosts(), "by-kubernetes").etag == by_kubernetes.etag
    assert get(kubernetes.image_hosts(), "by-approle").etag == by_approle.etag
    create(approle.image_hosts(), "later-approle", "registry.example.net")
    create(kubernetes.image_hosts(), "later-kubernetes", "registry.example.info")
    for broker, method in ((approle, "AppRole"), (kubernetes, "Kubernetes")):
        assert f"logging in again ({method})" in broker.text()
        assert broker.process.poll() is None
        assert_undisclosed(broker.text(), secret_id, jwt)


def test_a_renewable_token_is_renewed_before_it_expires(vault: VaultTarget) -> None:
    """A plain token cannot log in again: still working after more than its TTL of use
    proves the renewal thread (which waits in real time) renewed it."""
    prefix = vault.new_prefix()
    ttl = 3.0
    token = token_with_policy(vault, prefix, vault.policy_for_prefix(prefix), ttl=ttl)
    renewals_before = _renewals(vault)
    store = token_store(vault, prefix, token)
    try:
        version = store.commit([Put("hosts/a", {"n": 0}, 0)]).versions["hosts/a"]
        started = time.monotonic()
        reads = 0
        while time.monotonic() - started < ttl + 2.0:
            entry = store.get("hosts/a")
            assert entry is not None
            assert entry.version == version
            reads += 1
            time.sleep(0.25)
        store.commit([Put("hosts/a", {"n": 1}, version)])
    finally:
        store.close()
    assert reads > 10
    if vault.emulator is not None:
        assert _renewals(vault) - renewals_before >= 1
        info = vault.emulator.token_info(token)
        assert info is not None
        assert info["ttl"] > 0


def _renewals(vault: VaultTarget) -> int:
    if vault.emulator is None:
        return 0
    return sum(
        r.path == "/v1/auth/token/renew-self" and r.status == 200 for r in vault.emulator.requests
    )


# -- outages -----------------------------------------------------------------------


def test_a_sealed_vault_serves_cached_hosts_then_recovers_by_itself(
    vault: VaultTarget, start_broker: StartBroker
) -> None:
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    token = full_token(vault, prefix)
    broker = start_broker(vault, prefix, token=token, args=CACHED)
    hosts = broker.image_hosts()
    secret = fake_secret()
    cached = create(hosts, "cached", "registry.example.com", "robot", secret)
    listed = names(hosts)
    assert health(broker, STORE_HEALTH) == SERVING

    emulator.seal()
    try:
        time.sleep(CACHE_TTL + 0.1)  # stale now: served at once, refreshed in the background
        assert get(hosts, "cached").etag == cached.etag
        assert names(hosts) == listed
        state = wait_until(
            lambda: health(broker, STORE_HEALTH), lambda s: s == NOT_SERVING, timeout=HEALTH_TIMEOUT
        )
        assert state == NOT_SERVING
        assert health(broker, "") == SERVING
        assert health(broker, IMAGE_HOST_SERVICE) == SERVING

        error = expect_unavailable(lambda: get(hosts, "not-cached"), token, secret)
        assert "sealed" in error.message, error.message
        expect_unavailable(lambda: create(hosts, "new", "registry.example.org"), token, secret)
        expect_unavailable(lambda: rename(hosts, "cached", "renamed", cached.etag), token, secret)
        # The failed write leaves the cached copy usable while Vault is away.
        assert get(hosts, "cached").etag == cached.etag
        assert names(hosts) == listed
        assert broker.text().count("entering degraded mode") == 1
    finally:
        emulator.unseal()

    def recovered() -> int:
        get(hosts, "cached")  # traffic: the next refresh finds Vault back
        return health(broker, STORE_HEALTH)

    assert wait_until(recovered, lambda s: s == SERVING, timeout=HEALTH_TIMEOUT) == SERVING
    assert health(broker, "") == SERVING
    assert rename(hosts, "cached", "renamed", cached.etag).display_name == "renamed"
    create(hosts, "new", "registry.example.org")
    assert "back to normal" in broker.text()
    assert broker.text().count("entering degraded mode") == 1
    assert broker.process.poll() is None
    assert_undisclosed(broker.text(), token, secret)


def test_after_a_long_outage_health_recovers_without_traffic(
    vault: VaultTarget, start_broker: StartBroker
) -> None:
    """Past the stale window "" turns NOT_SERVING: a readiness probe takes the broker out
    of the Service, so it gets no calls; health alone must notice that Vault is back."""
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    token = full_token(vault, prefix)
    broker = start_broker(
        vault, prefix, token=token, args=("--cache-ttl", "0.2", "--cache-stale-window", "1")
    )
    hosts = broker.image_hosts()
    create(hosts, "a", "registry.example.com")

    emulator.seal()
    try:
        expect_unavailable(lambda: get(hosts, "not-cached"), token)
        overall = wait_until(
            lambda: health(broker, ""), lambda s: s == NOT_SERVING, timeout=HEALTH_TIMEOUT
        )
        assert overall == NOT_SERVING
        assert health(broker, STORE_HEALTH) == NOT_SERVING
    finally:
        emulator.unseal()

    # Health checks only, like a readiness probe.
    probe_only = wait_until(lambda: health(broker, ""), lambda s: s == SERVING, timeout=4.0)

    # With traffic it does recover (what test_a_sealed_vault_... relies on).
    def recovered() -> int:
        get(hosts, "a")
        return health(broker, "")

    assert wait_until(recovered, lambda s: s == SERVING, timeout=HEALTH_TIMEOUT) == SERVING
    if probe_only != SERVING:
        raise ExpectationFailed("health stayed NOT_SERVING after Vault came back")


def test_an_unreachable_vault_serves_cached_hosts_and_fails_the_rest(
    vault: VaultTarget, start_broker: StartBroker
) -> None:
    """The Vault process goes away (its own emulator here: the session's must stay up)."""
    emulator_of(vault)
    private = VaultEmulator().start()
    try:
        target = VaultTarget(url=private.url, token="", mount="secret", emulator=private)
        prefix = target.new_prefix()
        token = full_token(target, prefix)
        broker = start_broker(target, prefix, token=token, args=CACHED)
        hosts = broker.image_hosts()
        secret = fake_secret()
        cached = create(hosts, "cached", "registry.example.com", "robot", secret)
        listed = names(hosts)

        private.stop()
        time.sleep(CACHE_TTL + 0.1)
        assert get(hosts, "cached").etag == cached.etag
        assert names(hosts) == listed
        error = expect_unavailable(lambda: get(hosts, "not-cached"), token, secret)
        assert "cannot reach Vault" in error.message, error.message
        expect_unavailable(lambda: create(hosts, "new", "registry.example.org"), token, secret)
        state = wait_until(
            lambda: health(broker, STORE_HEALTH), lambda s: s == NOT_SERVING, timeout=HEALTH_TIMEOUT
        )
        assert state == NOT_SERVING
        assert health(broker, "") == SERVING
        assert broker.text().count("entering degraded mode") == 1
        assert broker.process.poll() is None
        assert_undisclosed(broker.text(), token, secret)
    finally:
        private.stop()
    assert private.server_errors == []


READ_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("HTTP 500", {"status": 500}),
    ("HTTP 502", {"status": 502}),
    ("HTTP 503", {"status": 503}),
    ("HTTP 429", {"status": 429}),
    ("dropped connection", {"drop": True}),
]


def test_read_faults_answer_unavailable_or_the_cached_copy_never_internal(
    vault: VaultTarget, start_broker: StartBroker
) -> None:
    emulator = emulator_of(vault)
    prefix = vault.new_prefix()
    token = full_token(vault, prefix)
    direct = start_broker(vault, prefix, token=token, args=NO_CACHE, name="uncached")
    cached = start_broker(vault, prefix, token=token, args=CACHED, name="cached")
    direct_hosts, cached_hosts = direct.image_hosts(), cached.image_hosts()
    host = create(direct_hosts, "h", "registry.example.com")
    assert get(cached_hosts, "h").etag == host.etag
    reads = rf"^/v1/{vault.mount}/data/{prefix}/"

    for label, fault in READ_FAULTS:
        emulator.inject(path_regex=reads, method="GET", **fault)
        try:
            error = expect_unavailable(lambda: get(direct_hosts, "h"), token)
            assert "Vault" in error.message, (label, error.message)
            assert get(cached_hosts, "h").etag == host.etag, label
            expect_unavailable(lambda: get(cached_hosts, "not-cached"), token)
        finally:
            emulator.clear_faults()
        assert get(direct_hosts, "h").etag == host.etag, label

    emulator.inject(path_regex=reads, method="POST", status=500)
    try:
        expect_unavailable(lambda: create(direct_hosts, "w", "registry.example.org"), token)
    finally:
        emulator.clear_faults()

    delay = 0.3
    emulator.inject(path_regex=reads, method="GET", delay=delay)
    try:
        started = time.monotonic()
        assert get(direct_hosts, "h").etag == host.etag  # 2 reads: well below the deadline
        assert time.monotonic() - started >= delay
    finally:
        emulator.clear_faults()
    for broker in (direct, cached):
        assert broker.process.poll() is None
        assert_undisclosed(broker.text(), token)
