"""Kubernetes pull secrets (issue #7) over real gRPC, a real broker and the Kubernetes API
emulator (tests/support/k8s_emulator.py, reached through a kubeconfig by the official
client inside the broker).

Every test ends with the same checks (`bed` fixture): no merge or strategic-merge patch
ever reached a service account (nor any PUT: the broker changes them with
test-guarded JSON patches only), the emulator saw no internal error, and no access
token appears anywhere in the broker's output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sysconfig
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from broker.security.principals import PrincipalsFile
from broker.v1 import (
    credentials_pb2,
    credentials_pb2_grpc,
    image_hosts_pb2_grpc,
    pull_secrets_pb2_grpc,
)
from broker.v1 import image_hosts_pb2 as ih
from broker.v1 import pull_secrets_pb2 as pb
from clients.channel import open_channel
from tests.support.auth_helpers import wait_until
from tests.support.broker_process import BrokerProcess
from tests.support.k8s_emulator import JSON_PATCH, K8sCluster, K8sEmulator
from tests.support.status import expect_error

pytestmark = pytest.mark.integration

CREDBROKER = Path(sysconfig.get_path("scripts")) / "credbroker"
SECRET = "credbroker-pull-secret"
MANAGED_BY = "app.kubernetes.io/managed-by"
CALL_TIMEOUT = 60.0
CLI_TIMEOUT = 90.0


# -- the bed: an emulator, a broker that reaches it, stubs --------------------------------


@dataclass
class Bed:
    broker: BrokerProcess
    k8s: K8sCluster
    tokens: list[str] = field(default_factory=list)

    @property
    def emu(self) -> K8sEmulator:
        return self.k8s.emulator

    @property
    def stub(self) -> pull_secrets_pb2_grpc.PullSecretServiceStub:
        return pull_secrets_pb2_grpc.PullSecretServiceStub(self.broker.channel())

    @property
    def hosts(self) -> image_hosts_pb2_grpc.ImageHostServiceStub:
        return self.broker.image_hosts()

    def token(self, label: str) -> str:
        value = f"tok-{label}-{secrets.token_hex(10)}"
        self.tokens.append(value)
        return value

    def host(self, image_host_id: str, url: str, username: str = "", token: str = "") -> None:
        self.hosts.CreateImageHost(
            ih.CreateImageHostRequest(
                image_host_id=image_host_id,
                image_host=ih.ImageHost(url=url, username=username, access_token=token),
            ),
            timeout=CALL_TIMEOUT,
        )

    def rotate(self, image_host_id: str, token: str) -> None:
        request = ih.UpdateImageHostRequest(
            image_host=ih.ImageHost(name=f"imageHosts/{image_host_id}", access_token=token)
        )
        request.update_mask.paths.append("access_token")
        self.hosts.UpdateImageHost(request, timeout=CALL_TIMEOUT)

    def provision(self, **fields: Any) -> pb.ProvisionPullSecretResponse:
        fields.setdefault("image_hosts", ["imageHosts/ghcr"])
        return self.stub.ProvisionPullSecret(
            pb.ProvisionPullSecretRequest(**fields), timeout=CALL_TIMEOUT
        )

    def revoke(self, **fields: Any) -> pb.RevokePullSecretResponse:
        return self.stub.RevokePullSecret(
            pb.RevokePullSecretRequest(**fields), timeout=CALL_TIMEOUT
        )

    def secret(self, namespace: str, name: str = SECRET) -> dict[str, Any] | None:
        return self.emu.get_object("secrets", namespace, name)

    def config(self, namespace: str, name: str = SECRET) -> dict[str, Any]:
        found = self.secret(namespace, name)
        assert found is not None, f"no secret {namespace}/{name}"
        decoded: dict[str, Any] = json.loads(base64.b64decode(found["data"][".dockerconfigjson"]))
        return decoded

    def refs(self, namespace: str, account: str = "default") -> list[Any]:
        sa = self.emu.get_object("serviceaccounts", namespace, account)
        assert sa is not None, f"no service account {namespace}/{account}"
        return list(sa.get("imagePullSecrets") or [])

    def set_refs(self, namespace: str, entries: list[Any], account: str = "default") -> None:
        def change(sa: dict[str, Any]) -> None:
            sa["imagePullSecrets"] = entries

        self.emu.mutate_object("serviceaccounts", namespace, account, change)

    def writes(self) -> list[Any]:
        return [r for r in self.emu.requests if r.method != "GET"]


def start_broker(tmp_path: Path, k8s: K8sCluster, *extra: str) -> BrokerProcess:
    args = ["--kubeconfig", str(k8s.kubeconfig), "--k8s-sync-interval", "0", *extra]
    return BrokerProcess(tmp_path / "data", args=args).start()


@pytest.fixture
def make_bed(tmp_path: Path, k8s_cluster: K8sCluster) -> Iterator[Callable[..., Bed]]:
    beds: list[Bed] = []

    def make(*extra: str) -> Bed:
        bed = Bed(start_broker(tmp_path, k8s_cluster, *extra), k8s_cluster)
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        assert bed.broker.stop() == 0
        _check_bed(bed)


def _check_bed(bed: Bed) -> None:
    for record in bed.emu.requests:
        if "/serviceaccounts" in record.path and record.method in ("PATCH", "PUT", "POST"):
            assert record.method == "PATCH", f"{record.method} {record.path}"
            assert record.content_type == JSON_PATCH, f"{record.content_type} on {record.path}"
            operations = record.json()
            assert operations[0]["op"] == "test", operations
            assert operations[0]["path"] == "/metadata/resourceVersion"
    output = bed.broker.text()
    leaked = [i for i, token in enumerate(bed.tokens) if token in output]
    assert not leaked, f"access token(s) #{leaked} in the broker's output"
    assert "Traceback" not in output
    assert "incident" not in output


@pytest.fixture
def bed(make_bed: Callable[..., Bed]) -> Bed:
    made = make_bed("--k8s-service-account-wait", "5")
    made.host("ghcr", "ghcr.io", "bot", made.token("ghcr"))
    for namespace in ("team-a", "team-b"):
        made.emu.create_namespace(namespace, labels={"team": "x"})
    return made


def _changes(response: Any) -> dict[str, tuple[str, list[tuple[str, str]], str]]:
    """namespace -> (secret change, [(account, change)], error code) in short words."""
    found = {}
    for result in response.results:
        secret = pb.SecretChange.Name(result.secret_change).removeprefix("SECRET_CHANGE_")
        accounts = [
            (
                a.name,
                pb.ServiceAccountChange.Name(a.change).removeprefix("SERVICE_ACCOUNT_CHANGE_"),
            )
            for a in result.service_accounts
        ]
        found[result.namespace] = (secret, accounts, result.error.code)
    return found


# -- provision and revoke keep every other entry -------------------------------------------


def test_existing_entries_survive_provision_and_revoke(bed: Bed) -> None:
    theirs = [{"name": "registry-a"}, {"name": "registry-b"}]
    bed.set_refs("team-a", theirs)
    answer = bed.provision(namespaces=["team-a"], service_accounts=["default"])
    assert _changes(answer) == {"team-a": ("CREATED", [("default", "PATCHED")], "")}
    assert bed.refs("team-a") == [*theirs, {"name": SECRET}]

    secret = bed.secret("team-a")
    assert secret is not None
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert secret["metadata"]["labels"][MANAGED_BY] == "credbroker"
    annotations = secret["metadata"]["annotations"]
    raw = base64.b64decode(secret["data"][".dockerconfigjson"])
    assert annotations["credbroker.dev/content-sha256"] == hashlib.sha256(raw).hexdigest()
    assert annotations["credbroker.dev/image-hosts"] == "imageHosts/ghcr"

    # Someone adds an entry after ours; the revoke removes ours alone.
    bed.set_refs("team-a", [*bed.refs("team-a"), {"name": "registry-c"}])
    revoked = bed.revoke(namespaces=["team-a"])
    assert _changes(revoked) == {"team-a": ("DELETED", [("default", "PATCHED")], "")}
    assert bed.refs("team-a") == [*theirs, {"name": "registry-c"}]
    assert bed.secret("team-a") is None


def test_two_provisioners_on_one_service_account_both_stay(bed: Bed) -> None:
    bed.set_refs("team-a", [{"name": "theirs"}])

    def sa_reads() -> int:
        return sum(
            1
            for r in bed.emu.requests
            if r.method == "GET" and r.path.endswith("/namespaces/team-a/serviceaccounts/default")
        )

    def hold() -> None:
        # The first write to the service account waits until the other provisioner has
        # read it too: both then hold the same resourceVersion, and one guarded patch
        # must fail (422) and be retried from a fresh read.
        wait_until(lambda: sa_reads() >= 2, "the second provisioner's read", interval=0.01)

    bed.emu.before_write(hold, kind="serviceaccounts", namespace="team-a", name="default")
    barrier = threading.Barrier(2)
    answers: dict[str, Any] = {}
    failures: list[BaseException] = []

    def provision(name: str) -> None:
        try:
            barrier.wait(10)
            answers[name] = bed.provision(namespaces=["team-a"], secret_name=name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=provision, args=(n,)) for n in ("pull-one", "pull-two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALL_TIMEOUT)
    assert not failures, failures
    for name in ("pull-one", "pull-two"):
        assert _changes(answers[name])["team-a"] == ("CREATED", [("default", "PATCHED")], "")
    refs = bed.refs("team-a")
    assert refs[0] == {"name": "theirs"}
    assert sorted(r["name"] for r in refs[1:]) == ["pull-one", "pull-two"]
    # The race did happen: a guarded patch lost (422) and was retried.
    statuses = [
        r.status
        for r in bed.emu.requests
        if r.method == "PATCH" and r.path.endswith("/serviceaccounts/default")
    ]
    assert 422 in statuses, statuses
    assert statuses.count(200) == 2


# -- dry run ------------------------------------------------------------------------------


def test_dry_run_changes_nothing_and_says_exactly_what_would(bed: Bed) -> None:
    bed.emu.create_namespace("team-c", labels={"team": "x"})
    bed.provision(namespaces=["team-b", "team-c"])
    # team-c drifts: its secret is edited and the reference removed.
    bed.emu.mutate_object(
        "secrets",
        "team-c",
        SECRET,
        lambda s: s["data"].update(
            {".dockerconfigjson": base64.b64encode(b'{"auths":{}}').decode()}
        ),
    )
    bed.set_refs("team-c", [{"name": "theirs"}])

    before = bed.emu.resource_version
    bed.emu.clear_requests()
    dry = bed.provision(namespace_selector="team=x", dry_run=True, keep_in_sync=True)
    assert dry.dry_run
    expected = {
        "team-a": ("CREATED", [("default", "PATCHED")], ""),
        "team-b": ("UNCHANGED", [("default", "UNCHANGED")], ""),
        "team-c": ("UPDATED", [("default", "PATCHED")], ""),
    }
    assert _changes(dry) == expected
    assert bed.emu.resource_version == before
    assert bed.writes() == []
    assert bed.secret("team-a") is None
    assert bed.refs("team-c") == [{"name": "theirs"}]

    listing = bed.stub.ListPullSecrets(pb.ListPullSecretsRequest(), timeout=CALL_TIMEOUT)
    assert [p.keep_in_sync for p in listing.pull_secrets] == [False, False]  # nothing recorded

    # Doing it for real does exactly what the dry run said.
    real = bed.provision(namespace_selector="team=x", keep_in_sync=True)
    assert _changes(real) == expected
    assert bed.emu.resource_version != before
    assert bed.refs("team-c") == [{"name": "theirs"}, {"name": SECRET}]

    # A dry-run revoke too.
    before = bed.emu.resource_version
    bed.emu.clear_requests()
    revoke = bed.revoke(namespace_selector="team=x", dry_run=True)
    assert {ns: r[0] for ns, r in _changes(revoke).items()} == dict.fromkeys(
        ("team-a", "team-b", "team-c"), "DELETED"
    )
    assert bed.emu.resource_version == before
    assert bed.writes() == []


# -- rotation, new namespaces, repairs --------------------------------------------------------


def test_rotation_reaches_every_managed_secret_at_once(bed: Bed) -> None:
    for namespace in ("team-c", "team-d"):
        bed.emu.create_namespace(namespace)
    bed.provision(namespaces=["team-a", "team-b"], keep_in_sync=True)
    bed.provision(namespaces=["team-c"])  # not kept in sync: rotation reaches it anyway
    bed.provision(namespaces=["team-d"], secret_name="other-name")
    rotated = bed.token("ghcr-rotated")
    bed.rotate("ghcr", rotated)

    targets = [("team-a", SECRET), ("team-b", SECRET), ("team-c", SECRET), ("team-d", "other-name")]

    def rotated_everywhere() -> bool:
        return all(
            bed.config(ns, name)["auths"]["ghcr.io"]["password"] == rotated for ns, name in targets
        )

    # The broker's sync interval is 0 here: only the rotation itself can trigger this.
    wait_until(rotated_everywhere, "the rotated token in every managed secret", timeout=10)
    listing = bed.stub.ListPullSecrets(pb.ListPullSecretsRequest(), timeout=CALL_TIMEOUT)
    assert [(p.namespace, p.secret_name, p.current) for p in listing.pull_secrets] == [
        (ns, name, True) for ns, name in targets
    ]
    assert all(list(p.image_hosts) == ["imageHosts/ghcr"] for p in listing.pull_secrets)


def test_a_rotation_touches_only_the_secrets_that_carry_the_host(bed: Bed) -> None:
    bed.host("quay", "quay.io", "robot", bed.token("quay"))
    bed.emu.create_namespace("team-c")
    bed.provision(namespaces=["team-a", "team-b"], keep_in_sync=True)
    bed.provision(namespaces=["team-c"], image_hosts=["imageHosts/quay"], keep_in_sync=True)
    untouched = bed.secret("team-c")
    bed.emu.clear_requests()

    rotated = bed.token("ghcr-rotated")
    bed.rotate("ghcr", rotated)

    def rotated_where_carried() -> bool:
        return all(
            bed.config(ns)["auths"]["ghcr.io"]["password"] == rotated for ns in ("team-a", "team-b")
        )

    wait_until(rotated_where_carried, "the rotated token in the secrets that carry ghcr")
    # The secret of another host is neither rewritten nor even read: a rotation costs
    # the secrets that carry the host, not the whole cluster.
    assert bed.secret("team-c") == untouched
    assert not [r for r in bed.emu.requests if "/namespaces/team-c/" in r.path]
    # One read per secret before its patch, not two.
    for namespace in ("team-a", "team-b"):
        path = f"/api/v1/namespaces/{namespace}/secrets/{SECRET}"
        reads = [r for r in bed.emu.requests if r.method == "GET" and r.path == path]
        assert len(reads) == 1, [(r.method, r.path) for r in bed.emu.requests]


def test_the_reconciler_provisions_new_namespaces_and_repairs_drift(
    make_bed: Callable[..., Bed],
) -> None:
    bed = make_bed("--k8s-sync-interval", "1", "--k8s-service-account-wait", "5")
    bed.host("ghcr", "ghcr.io", "bot", bed.token("ghcr"))
    bed.emu.create_namespace("team-a", labels={"team": "x"})
    bed.emu.create_namespace("other", labels={"team": "y"})
    answer = bed.provision(namespace_selector="team=x", keep_in_sync=True)
    assert list(_changes(answer)) == ["team-a"]

    # A namespace that matches later, created the way kubectl creates it: its default
    # service account appears a moment after it.
    core = bed.k8s.core_v1()
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name="team-new", labels={"team": "x"}))
    )
    wait_until(
        lambda: (
            bed.secret("team-new") is not None
            and {"name": SECRET} in _refs_or_empty(bed, "team-new")
        ),
        "the new namespace's secret and reference",
        timeout=15,
    )
    assert bed.secret("other") is None

    # A deleted managed secret comes back; a removed reference too; an edit is undone.
    bed.emu.delete_object("secrets", "team-a", SECRET)
    bed.set_refs("team-new", [{"name": "theirs"}])
    good = bed.config("team-new")
    bed.emu.mutate_object(
        "secrets", "team-new", SECRET, lambda s: s["data"].update({".dockerconfigjson": "e30="})
    )
    wait_until(lambda: bed.secret("team-a") is not None, "the deleted secret back", timeout=15)
    wait_until(
        lambda: bed.refs("team-new") == [{"name": "theirs"}, {"name": SECRET}],
        "the reference back, the other entry kept",
        timeout=15,
    )
    wait_until(lambda: bed.config("team-new") == good, "the edited secret repaired", timeout=15)

    # Revoke stops all of it for that namespace.
    bed.revoke(namespaces=["team-a"])
    synced = bed.stub.SyncPullSecrets(pb.SyncPullSecretsRequest(), timeout=CALL_TIMEOUT)
    assert "team-a" not in [r.namespace for r in synced.results]
    assert bed.secret("team-a") is None


def _refs_or_empty(bed: Bed, namespace: str) -> list[Any]:
    sa = bed.emu.get_object("serviceaccounts", namespace, "default")
    return list((sa or {}).get("imagePullSecrets") or [])


def test_a_default_service_account_that_never_appears_is_reported(
    make_bed: Callable[..., Bed],
) -> None:
    bed = make_bed("--k8s-service-account-wait", "1")
    bed.host("ghcr", "ghcr.io", "bot", bed.token("ghcr"))
    bed.emu.create_namespace("bare", default_service_account="never")
    bed.emu.create_namespace("slow", default_service_account="delayed")
    answer = bed.provision(namespaces=["bare", "slow"])
    bare, slow = answer.results
    assert bare.secret_change == pb.SECRET_CHANGE_CREATED
    (account,) = bare.service_accounts
    assert account.change == pb.SERVICE_ACCOUNT_CHANGE_NOT_FOUND
    assert account.error.code == "NOT_FOUND"
    assert account.error.message.startswith('serviceaccounts "default" not found')
    assert slow.service_accounts[0].change == pb.SERVICE_ACCOUNT_CHANGE_PATCHED


# -- errors per namespace ---------------------------------------------------------------------


def test_a_forbidden_namespace_reports_the_api_servers_words(bed: Bed) -> None:
    bed.emu.create_namespace("locked")
    bed.emu.forbid_namespace("locked")
    core = bed.k8s.core_v1()
    with pytest.raises(ApiException) as raised:
        core.read_namespace("locked")
    words = json.loads(raised.value.body)["message"]

    answer = bed.provision(namespaces=["locked", "team-a", "team-b"])
    results = {r.namespace: r for r in answer.results}
    locked = results["locked"]
    assert locked.error.code == "PERMISSION_DENIED"
    assert locked.error.reason == "KUBERNETES_FORBIDDEN"
    assert locked.error.message == words
    assert "forbidden" in words
    for namespace in ("team-a", "team-b"):
        assert results[namespace].secret_change == pb.SECRET_CHANGE_CREATED
        assert not results[namespace].HasField("error")


def test_a_foreign_secret_is_never_touched(bed: Bed) -> None:
    core = bed.k8s.core_v1()
    core.create_namespaced_secret(
        "team-a",
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=SECRET),
            type="kubernetes.io/dockerconfigjson",
            data={".dockerconfigjson": base64.b64encode(b'{"auths":{}}').decode()},
        ),
    )
    bed.set_refs("team-a", [{"name": SECRET}])
    before = bed.secret("team-a")
    provisioned = bed.provision(namespaces=["team-a", "team-b"])
    assert _changes(provisioned)["team-a"][2] == "FAILED_PRECONDITION"
    assert provisioned.results[0].error.reason == "SECRET_NOT_MANAGED"
    assert _changes(provisioned)["team-b"][0] == "CREATED"
    revoked = bed.revoke(namespaces=["team-a"])
    assert revoked.results[0].error.code == "FAILED_PRECONDITION"
    assert bed.secret("team-a") == before
    assert bed.refs("team-a") == [{"name": SECRET}]


def test_unknown_namespace_and_bad_requests(bed: Bed) -> None:
    answer = bed.provision(namespaces=["nowhere", "team-a"])
    nowhere = _changes(answer)["nowhere"]
    assert nowhere[2] == "NOT_FOUND"
    assert answer.results[0].error.message == 'namespaces "nowhere" not found'
    error = expect_error(lambda: bed.provision(namespaces=["team-a"], secret_name="Not_A_Name"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "secret_name" in error.violations
    assert "Not_A_Name" not in error.message
    error = expect_error(lambda: bed.provision(namespace_selector="team in (x"))
    assert "namespace_selector" in error.violations
    error = expect_error(lambda: bed.provision(namespaces=["team-a"], image_hosts=[]))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


# -- the content is what ResolveCredentials hands out -------------------------------------------


def test_dockerconfigjson_matches_resolve_credentials_for_every_registry(bed: Bed) -> None:
    hub = bed.token("hub")
    request = ih.UpdateImageHostRequest(
        image_host=ih.ImageHost(name="imageHosts/docker-hub", username="hubber", access_token=hub)
    )
    request.update_mask.paths.extend(["username", "access_token"])
    bed.hosts.UpdateImageHost(request, timeout=CALL_TIMEOUT)
    bed.host("acme", "ghcr.io/acme", "acme-bot", bed.token("acme"))
    bed.host("local", "http://127.0.0.1:5000", "ci", bed.token("local"))
    bed.host("acr", "acme.azurecr.io", "<token>", bed.token("acr"))
    bed.host("anon", "anon.example.org")
    hosts = ["docker-hub", "ghcr", "acme", "local", "acr", "anon"]
    answer = bed.provision(namespaces=["team-a"], image_hosts=[f"imageHosts/{h}" for h in hosts])
    assert not answer.results[0].HasField("error")
    auths = bed.config("team-a")["auths"]
    assert sorted(auths) == sorted(
        [
            "https://index.docker.io/v1/",
            "ghcr.io",
            "ghcr.io/acme",
            "127.0.0.1:5000",
            "acme.azurecr.io",
        ]
    )

    resolver = credentials_pb2_grpc.CredentialServiceStub(bed.broker.channel())
    for image in (
        "ubuntu",
        "docker.io/team/tool:1",
        "ghcr.io/other/app",
        "ghcr.io/acme/app:2",
        "127.0.0.1:5000/team/tool",
        "acme.azurecr.io/app",
    ):
        resolved = resolver.ResolveCredentials(
            credentials_pb2.ResolveCredentialsRequest(image=image), timeout=CALL_TIMEOUT
        )
        assert not resolved.anonymous, image
        key = kubelet_key(auths, resolved.image)
        entry = auths[key]
        assert (entry["username"], entry["password"]) == (resolved.username, resolved.secret), image
        expected_auth = base64.b64encode(f"{resolved.username}:{resolved.secret}".encode()).decode()
        assert entry["auth"] == expected_auth, image
        assert set(entry) == {"username", "password", "auth"}
        if "/" not in key.removeprefix("https://"):
            assert key == resolved.server_address, image
        else:
            assert key.endswith("/acme") or key == "https://index.docker.io/v1/"
    # The anonymous host added nothing.
    assert not any("anon.example.org" in k for k in auths)


def kubelet_key(auths: dict[str, Any], image: str) -> str:
    """The key the kubelet's keyring uses for a fully qualified image: the most specific
    key whose host equals the image's and whose path is a prefix of its repository;
    Docker Hub's `https://index.docker.io/v1/` serves docker.io images."""
    name = image.split("@", 1)[0]
    registry, _, repository = name.partition("/")
    repository = (
        repository.rsplit(":", 1)[0] if ":" in repository.rsplit("/", 1)[-1] else repository
    )
    candidates = []
    for key in auths:
        plain = key.removeprefix("https://").removeprefix("http://")
        host, _, path = plain.partition("/")
        path = path.strip("/")
        if path in ("v1", "v2"):
            path = ""
        if host == "index.docker.io":
            host = "docker.io"
        if host == registry and (
            not path or repository == path or repository.startswith(path + "/")
        ):
            candidates.append((len(path), key))
    assert candidates, f"no key for {image}"
    return max(candidates)[1]


# -- cluster access ---------------------------------------------------------------------------


def test_no_cluster_configured_is_failed_precondition(tmp_path: Path) -> None:
    env = {"KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""}
    broker = BrokerProcess(tmp_path / "data", env=env).start()
    try:
        stub = pull_secrets_pb2_grpc.PullSecretServiceStub(broker.channel())
        for call in (
            lambda: stub.ListPullSecrets(pb.ListPullSecretsRequest(), timeout=CALL_TIMEOUT),
            lambda: stub.SyncPullSecrets(pb.SyncPullSecretsRequest(), timeout=CALL_TIMEOUT),
            lambda: stub.RevokePullSecret(
                pb.RevokePullSecretRequest(namespaces=["a"]), timeout=CALL_TIMEOUT
            ),
        ):
            error = expect_error(call)
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION
            assert error.reason == "KUBERNETES_NOT_CONFIGURED"
    finally:
        assert broker.stop() == 0


def test_an_unreachable_api_server_is_unavailable(tmp_path: Path) -> None:
    emulator = K8sEmulator().start()
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    address = emulator.url.removeprefix("http://")
    emulator.stop()  # nothing listens there any more
    broker = BrokerProcess(tmp_path / "data", args=["--kubeconfig", str(kubeconfig)]).start()
    try:
        stub = pull_secrets_pb2_grpc.PullSecretServiceStub(broker.channel())
        broker.image_hosts().CreateImageHost(
            ih.CreateImageHostRequest(
                image_host_id="ghcr",
                image_host=ih.ImageHost(url="ghcr.io", username="u", access_token="t-unreach"),
            ),
            timeout=CALL_TIMEOUT,
        )
        error = expect_error(
            lambda: stub.ProvisionPullSecret(
                pb.ProvisionPullSecretRequest(
                    namespaces=["a", "b"], image_hosts=["imageHosts/ghcr"]
                ),
                timeout=CALL_TIMEOUT,
            )
        )
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.reason == "KUBERNETES_UNREACHABLE"
        assert address in error.message
    finally:
        assert broker.stop() == 0


def test_a_kubeconfig_context_is_honoured(tmp_path: Path, k8s_cluster: K8sCluster) -> None:
    # Two contexts: the current one points at a closed port, "emu" at the emulator.
    dead = K8sEmulator().start()
    kubeconfig = tmp_path / "two-contexts"
    dead.write_kubeconfig(kubeconfig, context_name="dead")
    dead.stop()
    k8s_cluster.emulator.write_kubeconfig(kubeconfig, context_name="emu", merge=True)
    k8s_cluster.emulator.create_namespace("team-a")
    broker = BrokerProcess(
        tmp_path / "data", args=["--kubeconfig", str(kubeconfig), "--kube-context", "emu"]
    ).start()
    try:
        broker.image_hosts().CreateImageHost(
            ih.CreateImageHostRequest(
                image_host_id="ghcr",
                image_host=ih.ImageHost(url="ghcr.io", username="u", access_token="t-context"),
            ),
            timeout=CALL_TIMEOUT,
        )
        stub = pull_secrets_pb2_grpc.PullSecretServiceStub(broker.channel())
        answer = stub.ProvisionPullSecret(
            pb.ProvisionPullSecretRequest(namespaces=["team-a"], image_hosts=["imageHosts/ghcr"]),
            timeout=CALL_TIMEOUT,
        )
        assert answer.results[0].secret_change == pb.SECRET_CHANGE_CREATED
    finally:
        assert broker.stop() == 0
    bad = BrokerProcess(tmp_path / "data2", args=["--kubeconfig", str(tmp_path / "missing.yaml")])
    with pytest.raises(RuntimeError, match="kubeconfig"):
        bad.start()


# -- scope -------------------------------------------------------------------------------------


def test_a_scoped_provisioner(bed: Bed) -> None:
    bed.host("quay", "quay.io", "q", bed.token("quay"))
    bed.provision(namespaces=["team-b"], image_hosts=["imageHosts/quay"])
    token = PrincipalsFile(bed.broker.data_dir / "principals.json").add(
        "team-prov", ["provisioner"], image_hosts=["ghcr"]
    )
    assert token is not None
    channel = open_channel(bed.broker.address, token=token)
    try:
        stub = pull_secrets_pb2_grpc.PullSecretServiceStub(channel)
        wait_until(lambda: _accepted(stub), "the broker to accept the new principal")
        for name in ("imageHosts/quay", "imageHosts/does-not-exist"):
            error = expect_error(
                lambda name=name: stub.ProvisionPullSecret(
                    pb.ProvisionPullSecretRequest(namespaces=["team-a"], image_hosts=[name]),
                    timeout=CALL_TIMEOUT,
                )
            )
            assert (error.code, error.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "IMAGE_HOST_OUT_OF_SCOPE",
            )
        answer = stub.ProvisionPullSecret(
            pb.ProvisionPullSecretRequest(
                namespaces=["team-a", "team-b"], image_hosts=["imageHosts/ghcr"]
            ),
            timeout=CALL_TIMEOUT,
        )
        results = {r.namespace: r for r in answer.results}
        assert results["team-a"].secret_change == pb.SECRET_CHANGE_CREATED
        assert results["team-b"].error.code == "PERMISSION_DENIED"  # it carries quay
        listed = stub.ListPullSecrets(pb.ListPullSecretsRequest(), timeout=CALL_TIMEOUT)
        assert [p.namespace for p in listed.pull_secrets] == ["team-a"]
    finally:
        channel.close()
    assert list(bed.config("team-b")["auths"]) == ["quay.io"]


def _accepted(stub: pull_secrets_pb2_grpc.PullSecretServiceStub) -> bool:
    try:
        stub.ListPullSecrets(pb.ListPullSecretsRequest(), timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:  # type: ignore[attr-defined]
            return False
        raise
    return True


# -- the CLI ----------------------------------------------------------------------------------


def _cli(bed: Bed, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    env["CREDBROKER_SERVER"] = bed.broker.address
    env["CREDBROKER_TOKEN_FILE"] = str(bed.broker.admin_token_path)
    return subprocess.run(
        [str(CREDBROKER), "k8s", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def test_cli_provision_list_sync_revoke(bed: Bed) -> None:
    bed.set_refs("team-a", [{"name": "theirs"}])
    before = bed.emu.resource_version
    dry = _cli(bed, "provision", "-l", "team=x", "--image-host", "ghcr", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout
    assert "team-a" in dry.stdout
    assert "created" in dry.stdout
    assert bed.emu.resource_version == before

    done = _cli(bed, "provision", "-n", "team-a", "-n", "nowhere", "--image-host", "ghcr", "--json")
    assert done.returncode == 1, done.stderr  # one namespace failed
    answer = json.loads(done.stdout)
    by_namespace = {r["namespace"]: r for r in answer["results"]}
    assert by_namespace["team-a"]["secret_change"] == "SECRET_CHANGE_CREATED"
    assert by_namespace["nowhere"]["error"]["code"] == "NOT_FOUND"
    assert bed.refs("team-a") == [{"name": "theirs"}, {"name": SECRET}]

    listed = _cli(bed, "list")
    assert listed.returncode == 0, listed.stderr
    assert "team-a" in listed.stdout
    assert "current" in listed.stdout
    listed_json = json.loads(_cli(bed, "list", "--json").stdout)
    assert listed_json["pull_secrets"][0]["current"] is True

    synced = _cli(bed, "sync", "--json")
    assert synced.returncode == 0, synced.stderr
    assert json.loads(synced.stdout)["results"][0]["secret_change"] == "SECRET_CHANGE_UNCHANGED"

    revoked = _cli(bed, "revoke", "-n", "team-a")
    assert revoked.returncode == 0, revoked.stderr
    assert "deleted" in revoked.stdout
    assert bed.refs("team-a") == [{"name": "theirs"}]

    usage = _cli(bed, "provision", "--image-host", "ghcr")
    assert usage.returncode == 2
    for run in (dry, done, listed, synced, revoked):
        for token in bed.tokens:
            assert token not in run.stdout + run.stderr


# -- least privilege ------------------------------------------------------------------------

RBAC = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "rbac.yaml"
_VERBS = {("GET", False): "list", ("POST", False): "create", ("GET", True): "get"}
_ITEM_VERBS = {"PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def _rbac_rules() -> set[tuple[str, str]]:
    granted = set()
    for document in yaml.safe_load_all(RBAC.read_text()):
        if document["kind"] == "ClusterRole":
            for rule in document["rules"]:
                assert rule["apiGroups"] == [""]
                granted |= {(r, v) for r in rule["resources"] for v in rule["verbs"]}
    return granted


def _verb_of(method: str, path: str) -> tuple[str, str]:
    parts = path.removeprefix("/api/v1/").split("/")
    if parts[0] != "namespaces":
        raise AssertionError(f"unexpected request {method} {path}")
    if len(parts) <= 2:  # the namespaces themselves
        resource, item = "namespaces", len(parts) == 2
    else:
        resource, item = parts[2], len(parts) == 4
    verb = _ITEM_VERBS.get(method) if item else None
    return resource, verb or _VERBS[(method, item)]


def test_the_shipped_rbac_is_exactly_what_the_broker_uses(bed: Bed) -> None:
    bed.emu.create_namespace("team-c", labels={"team": "x"})
    bed.provision(namespace_selector="team=x", keep_in_sync=True)
    bed.provision(namespaces=["team-c"], secret_name="second")
    bed.emu.delete_object("secrets", "team-b", SECRET)
    bed.rotate("ghcr", bed.token("rotated"))
    bed.stub.SyncPullSecrets(pb.SyncPullSecretsRequest(), timeout=CALL_TIMEOUT)
    bed.stub.ListPullSecrets(pb.ListPullSecretsRequest(), timeout=CALL_TIMEOUT)
    bed.revoke(namespaces=["team-c"], secret_name="second")
    bed.revoke(namespace_selector="team=x")
    used = {_verb_of(r.method, r.path) for r in bed.emu.requests}
    granted = _rbac_rules()
    assert used <= granted, f"the broker needs more than deploy/kubernetes grants: {used - granted}"
    assert granted <= used, f"deploy/kubernetes grants more than the broker uses: {granted - used}"
