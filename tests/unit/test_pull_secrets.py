"""Pull-secret domain logic without I/O: content bytes, names, patches, and the manager
against an in-memory cluster whose races the tests time exactly."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from broker.core.audit import Actor, AuditEvent
from broker.core.cluster import (
    KUBERNETES_CONFLICT,
    KUBERNETES_FORBIDDEN,
    KUBERNETES_INVALID,
    KUBERNETES_NOT_CONFIGURED,
    KUBERNETES_UNREACHABLE,
    KubeObject,
)
from broker.core.dockerconfig import build_content, decode_data, go_json, server_key
from broker.core.errors import (
    Aborted,
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from broker.core.image_hosts import HostFields, ImageHostCatalog
from broker.core.kube_names import (
    InvalidSelector,
    label_violation,
    normalise_selector,
    subdomain_violation,
)
from broker.core.pull_secret_store import PullSecretRegistry
from broker.core.pull_secrets import (
    DEFAULT_SECRET_NAME,
    INSTALLATION_ANNOTATION,
    MANAGED_BY_LABEL,
    SHA256_ANNOTATION,
    AccountChange,
    ProvisionRequest,
    PullSecretManager,
    RevokeRequest,
    SecretChange,
    SecretState,
    Tuning,
    add_reference_patch,
    remove_reference_patch,
)
from broker.core.resolution import CredentialResolver
from broker.core.secrets import Secret
from broker.stores.memory import MemoryStore

ADMIN = Actor(principal="admin", peer="ipv4:127.0.0.1:1")
TOKEN = "tok-unit-Zq81"
TOKEN_2 = "tok-unit-rotated-Lp02"

# -- an in-memory cluster -------------------------------------------------------------------


class PatchFailed(Exception):
    pass


def _walk(doc: Any, path: str) -> tuple[Any, str]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc, parts[-1]


def apply_patch(obj: KubeObject, ops: list[KubeObject]) -> KubeObject:
    """The RFC 6902 subset the broker sends: test, add, remove."""
    doc = copy.deepcopy(obj)
    for op in ops:
        parent, last = _walk(doc, op["path"])
        if op["op"] == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op["value"]:
                raise PatchFailed(op["path"])
        elif op["op"] == "add":
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                else:
                    parent.insert(int(last), op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:  # pragma: no cover - the broker sends nothing else
            raise AssertionError(op)
    return doc


class FakeCluster:
    """Objects as JSON; every write moves resourceVersion; writes are logged."""

    server = "https://cluster.test"

    def __init__(self) -> None:
        self.rv = 0
        self.namespaces: dict[str, KubeObject] = {}
        self.secrets: dict[tuple[str, str], KubeObject] = {}
        self.accounts: dict[tuple[str, str], KubeObject] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.forbidden: set[str] = set()
        self.unreachable = False
        #: Runs once before the next write of this kind: another writer's move.
        self.before_write: dict[str, Callable[[], None]] = {}
        #: Answer the next SA patch with a 422 that is not a lost race.
        self.invalid_patch = False
        #: Polls left before a missing default service account appears (None: never).
        self.default_appears_after: dict[str, int] = {}

    def _next(self) -> str:
        self.rv += 1
        return str(self.rv)

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.namespaces[name] = {
            "metadata": {"name": name, "labels": labels or {}, "resourceVersion": self._next()},
            "status": {"phase": "Active"},
        }
        self.put_account(name, "default")

    def put_account(self, namespace: str, name: str, entries: list[Any] | None = None) -> None:
        sa: KubeObject = {"metadata": {"name": name, "namespace": namespace}}
        if entries is not None:
            sa["imagePullSecrets"] = entries
        sa["metadata"]["resourceVersion"] = self._next()
        self.accounts[(namespace, name)] = sa

    def _check(self, namespace: str) -> None:
        if self.unreachable:
            raise Unavailable("connection refused", reason=KUBERNETES_UNREACHABLE)
        if namespace in self.forbidden:
            raise PermissionDenied(
                f'secrets is forbidden: User "u" cannot get resource "secrets" in API group "" '
                f'in the namespace "{namespace}"',
                reason=KUBERNETES_FORBIDDEN,
            )

    def _hook(self, kind: str) -> None:
        hook = self.before_write.pop(kind, None)
        if hook is not None:
            hook()

    def get_namespace(self, name: str) -> KubeObject | None:
        self._check(name)
        found = self.namespaces.get(name)
        return copy.deepcopy(found) if found else None

    def list_namespaces(self, label_selector: str) -> list[KubeObject]:
        if self.unreachable:
            raise Unavailable("connection refused", reason=KUBERNETES_UNREACHABLE)
        key, _, value = label_selector.partition("=")
        return [
            copy.deepcopy(n)
            for n in self.namespaces.values()
            if n["metadata"]["labels"].get(key) == value
        ]

    def get_secret(self, namespace: str, name: str) -> KubeObject | None:
        self._check(namespace)
        found = self.secrets.get((namespace, name))
        return copy.deepcopy(found) if found else None

    def create_secret(self, namespace: str, body: KubeObject) -> KubeObject:
        self._check(namespace)
        self._hook("secrets")
        name = body["metadata"]["name"]
        if (namespace, name) in self.secrets:
            raise AlreadyExists(
                f'secrets "{name}" already exists', reason="KUBERNETES_ALREADY_EXISTS"
            )
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = self._next()
        self.secrets[(namespace, name)] = stored
        self.writes.append(("create", "secrets", f"{namespace}/{name}"))
        return stored

    def patch_secret(self, namespace: str, name: str, patch: list[KubeObject]) -> KubeObject:
        return self._patch(self.secrets, "secrets", namespace, name, patch)

    def delete_secret(self, namespace: str, name: str, resource_version: str) -> None:
        self._check(namespace)
        self._hook("secrets")
        current = self.secrets.get((namespace, name))
        if current is None:
            raise NotFound(f'secrets "{name}" not found', reason="KUBERNETES_NOT_FOUND")
        if current["metadata"]["resourceVersion"] != resource_version:
            raise Aborted("Operation cannot be fulfilled", reason=KUBERNETES_CONFLICT)
        del self.secrets[(namespace, name)]
        self.rv += 1
        self.writes.append(("delete", "secrets", f"{namespace}/{name}"))

    def get_service_account(self, namespace: str, name: str) -> KubeObject | None:
        self._check(namespace)
        found = self.accounts.get((namespace, name))
        if found is None and namespace in self.default_appears_after and name == "default":
            self.default_appears_after[namespace] -= 1
            if self.default_appears_after[namespace] <= 0:
                del self.default_appears_after[namespace]
                self.put_account(namespace, "default")
            return None
        return copy.deepcopy(found) if found else None

    def list_service_accounts(self, namespace: str) -> list[KubeObject]:
        self._check(namespace)
        return [
            copy.deepcopy(sa) for (ns, _), sa in sorted(self.accounts.items()) if ns == namespace
        ]

    def patch_service_account(
        self, namespace: str, name: str, patch: list[KubeObject]
    ) -> KubeObject:
        if self.invalid_patch:
            self.invalid_patch = False
            raise FailedPrecondition("ServiceAccount is invalid", reason=KUBERNETES_INVALID)
        return self._patch(self.accounts, "serviceaccounts", namespace, name, patch)

    def _patch(
        self,
        objects: dict[tuple[str, str], KubeObject],
        kind: str,
        namespace: str,
        name: str,
        patch: list[KubeObject],
    ) -> KubeObject:
        self._check(namespace)
        self._hook(kind)
        current = objects.get((namespace, name))
        if current is None:
            raise NotFound(f'{kind} "{name}" not found', reason="KUBERNETES_NOT_FOUND")
        try:
            patched = apply_patch(current, patch)
        except PatchFailed:
            raise FailedPrecondition(
                "the server rejected our request due to an error in our request",
                reason=KUBERNETES_INVALID,
            ) from None
        patched["metadata"]["resourceVersion"] = self._next()
        objects[(namespace, name)] = patched
        self.writes.append(("patch", kind, f"{namespace}/{name}"))
        return patched


# -- fixtures --------------------------------------------------------------------------------


class Env:
    def __init__(self, cluster: FakeCluster | None) -> None:
        self.store = MemoryStore()
        self.events: list[AuditEvent] = []
        self.catalog = ImageHostCatalog(self.store, self.events.append)
        self.catalog.ensure_seeded()
        self.cluster = cluster
        self.sleeps: list[float] = []
        self.clock = 0.0
        self.manager = PullSecretManager(
            self.catalog,
            CredentialResolver(self.catalog, self.events.append),
            PullSecretRegistry(self.store),
            cluster,
            self.events.append,
            Tuning(service_account_wait=2.0, workers=1),
            sleep=self._sleep,
            monotonic=lambda: self.clock,
        )

    def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock += seconds

    def host(self, image_host_id: str, url: str, username: str = "", token: str = "") -> None:
        self.catalog.create(
            image_host_id,
            HostFields(url=url, username=username, access_token=Secret(token)),
            ADMIN,
        )

    def provision(self, **fields: Any) -> list[Any]:
        actor = fields.pop("actor", ADMIN)
        fields.setdefault("image_hosts", ["imageHosts/ghcr"])
        return self.manager.provision(ProvisionRequest(**fields), actor).results

    def auths(self, namespace: str, name: str = DEFAULT_SECRET_NAME) -> dict[str, Any]:
        assert self.cluster is not None
        raw = decode_data(self.cluster.secrets[(namespace, name)])
        assert raw is not None
        result: dict[str, Any] = json.loads(raw)["auths"]
        return result


@pytest.fixture
def cluster() -> FakeCluster:
    fake = FakeCluster()
    for name in ("team-a", "team-b"):
        fake.add_namespace(name, {"team": "x"})
    return fake


@pytest.fixture
def env(cluster: FakeCluster) -> Env:
    environment = Env(cluster)
    environment.host("ghcr", "ghcr.io", "bot", TOKEN)
    return environment


def _refs(cluster: FakeCluster, namespace: str, account: str = "default") -> list[Any]:
    return list(cluster.accounts[(namespace, account)].get("imagePullSecrets", []))


# -- .dockerconfigjson -----------------------------------------------------------------------


def _host(catalog_env: Env, image_host_id: str) -> Any:
    return next(h for h in catalog_env.catalog.all_hosts() if h.id == image_host_id)


def test_content_is_byte_for_byte_what_kubectl_writes() -> None:
    environment = Env(None)
    environment.catalog.update(
        "docker-hub",
        HostFields(username="u", access_token=Secret("p")),
        ["username", "access_token"],
        "",
        ADMIN,
    )
    # kubectl create secret docker-registry x --docker-username=u --docker-password=p
    expected = (
        b'{"auths":{"https://index.docker.io/v1/":{"username":"u","password":"p","auth":"dTpw"}}}'
    )
    assert build_content([_host(environment, "docker-hub")]).raw == expected


def test_content_keys_sorted_anonymous_left_out_prefix_kept() -> None:
    environment = Env(None)
    environment.host("zeta", "zeta.example.org:5000", "z", "zz")
    environment.host("acme", "ghcr.io/acme", "a", "aa")
    environment.host("ghcr", "ghcr.io", "g", "gg")
    environment.host("anon", "anon.example.org")
    hosts = [_host(environment, i) for i in ("zeta", "acme", "ghcr", "anon")]
    content = build_content(hosts)
    auths = json.loads(content.raw)["auths"]
    assert list(auths) == ["ghcr.io", "ghcr.io/acme", "zeta.example.org:5000"]
    assert content.image_host_ids == ("ghcr", "acme", "zeta")
    assert server_key(_host(environment, "acme")) == "ghcr.io/acme"
    assert base64.b64decode(auths["ghcr.io/acme"]["auth"]) == b"a:aa"
    assert TOKEN not in repr(content)


def test_go_json_escapes_like_encoding_json() -> None:
    assert go_json({"u": "<token>&\u2028"}) == '{"u":"\\u003ctoken\\u003e\\u0026\\u2028"}'
    assert go_json("é") == '"é"'


def test_identity_token_hosts_keep_the_marker_username() -> None:
    environment = Env(None)
    environment.host("acr", "acme.azurecr.io", "<token>", "refresh-9")
    raw = build_content([_host(environment, "acr")]).raw
    assert b"\\u003ctoken\\u003e" in raw
    entry = json.loads(raw)["auths"]["acme.azurecr.io"]
    assert entry["username"] == "<token>"
    assert base64.b64decode(entry["auth"]) == b"<token>:refresh-9"


# -- names and selectors ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "team-a", "a" * 63, "0ab"])
def test_valid_labels(value: str) -> None:
    assert label_violation(value) is None


@pytest.mark.parametrize("value", ["", "A", "-a", "a-", "a.b", "a" * 64, "a_b"])
def test_invalid_labels(value: str) -> None:
    assert label_violation(value) is not None


def test_subdomains() -> None:
    assert subdomain_violation("credbroker-pull-secret") is None
    assert subdomain_violation("a.b-c.d") is None
    for bad in ("", "a..b", ".a", "A", "a" * 254, "LK001Xsecret"):
        assert subdomain_violation(bad) is not None


@pytest.mark.parametrize(
    ("selector", "normalised"),
    [
        ("team=a", "team=a"),
        ("team==a", "team=a"),
        (" env in (prod, staging) ,team!=b", "env in (prod,staging),team!=b"),
        ("!legacy,example.com/tier", "example.com/tier,!legacy"),
        ("b=1,a=2", "a=2,b=1"),
        ("a notin (y,x)", "a notin (x,y)"),
        ("empty=", "empty="),
    ],
)
def test_selectors_normalise(selector: str, normalised: str) -> None:
    assert normalise_selector(selector) == normalised


@pytest.mark.parametrize(
    "selector",
    [
        "",
        "=a",
        "a=b=c",
        "a in ()",
        "a in (x",
        "a>1",
        "a=" + "v" * 64,
        "-a=b",
        "a,,b",
        "a b",
        "x/=y",
    ],
)
def test_invalid_selectors_never_quote_the_input(selector: str) -> None:
    with pytest.raises(InvalidSelector) as raised:
        normalise_selector(selector)
    if len(selector) > 3:
        assert selector not in str(raised.value)


# -- patches ---------------------------------------------------------------------------------


def test_add_reference_appends_or_creates_the_list() -> None:
    sa = {"metadata": {"resourceVersion": "7"}, "imagePullSecrets": [{"name": "other"}]}
    patched = apply_patch(sa, add_reference_patch("7", sa["imagePullSecrets"], "mine"))
    assert patched["imagePullSecrets"] == [{"name": "other"}, {"name": "mine"}]
    bare = {"metadata": {"resourceVersion": "3"}}
    assert apply_patch(bare, add_reference_patch("3", None, "mine"))["imagePullSecrets"] == [
        {"name": "mine"}
    ]
    with pytest.raises(PatchFailed):  # the guard: a stale read changes nothing
        apply_patch(sa, add_reference_patch("6", sa["imagePullSecrets"], "mine"))


def test_remove_reference_removes_every_copy_and_nothing_else() -> None:
    entries = [{"name": "mine"}, {"name": "a"}, {"name": "mine"}, {"name": "b"}]
    sa = {"metadata": {"resourceVersion": "9"}, "imagePullSecrets": entries}
    patch = remove_reference_patch("9", entries, "mine")
    assert patch is not None
    assert patch[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "9"}
    assert apply_patch(sa, patch)["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
    assert remove_reference_patch("9", [{"name": "a"}], "mine") is None
    assert remove_reference_patch("9", None, "mine") is None


# -- provisioning ------------------------------------------------------------------------------


def test_provision_creates_the_secret_and_keeps_existing_entries(
    env: Env, cluster: FakeCluster
) -> None:
    cluster.put_account("team-a", "default", [{"name": "theirs"}, {}])
    results = env.provision(namespaces=["team-a"])
    (result,) = results
    assert result.error is None
    assert result.secret_change == SecretChange.CREATED
    assert [(a.name, a.change) for a in result.service_accounts] == [
        ("default", AccountChange.PATCHED)
    ]
    assert _refs(cluster, "team-a") == [{"name": "theirs"}, {}, {"name": DEFAULT_SECRET_NAME}]
    secret = cluster.secrets[("team-a", DEFAULT_SECRET_NAME)]
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert secret["metadata"]["labels"] == {MANAGED_BY_LABEL: "credbroker"}
    annotations = secret["metadata"]["annotations"]
    assert annotations[SHA256_ANNOTATION] == build_content([_host(env, "ghcr")]).sha256
    assert annotations["credbroker.dev/image-hosts"] == "imageHosts/ghcr"
    assert annotations[INSTALLATION_ANNOTATION]
    assert env.auths("team-a") == {
        "ghcr.io": {
            "username": "bot",
            "password": TOKEN,
            "auth": base64.b64encode(f"bot:{TOKEN}".encode()).decode(),
        }
    }
    # Again: nothing to do, nothing written.
    writes = len(cluster.writes)
    (again,) = env.provision(namespaces=["team-a"])
    assert again.secret_change == SecretChange.UNCHANGED
    assert again.service_accounts[0].change == AccountChange.UNCHANGED
    assert len(cluster.writes) == writes
    assert not any(TOKEN in str(e.details) for e in env.events)


def test_a_lost_race_on_the_service_account_is_retried_and_keeps_both(
    env: Env, cluster: FakeCluster
) -> None:
    # Between the broker's read and its patch, someone else adds an entry.
    cluster.before_write["serviceaccounts"] = lambda: cluster.put_account(
        "team-a", "default", [{"name": "racer"}]
    )
    (result,) = env.provision(namespaces=["team-a"])
    assert result.service_accounts[0].change == AccountChange.PATCHED
    assert _refs(cluster, "team-a") == [{"name": "racer"}, {"name": DEFAULT_SECRET_NAME}]
    assert env.sleeps  # it backed off before the retry


def test_a_422_that_was_no_race_is_reported_as_it_is(env: Env, cluster: FakeCluster) -> None:
    cluster.invalid_patch = True
    (result,) = env.provision(namespaces=["team-a"])
    account = result.service_accounts[0]
    assert account.change == AccountChange.FAILED
    assert account.error is not None
    assert account.error.reason == KUBERNETES_INVALID
    assert result.failed


def test_endless_races_give_up_with_aborted(env: Env, cluster: FakeCluster) -> None:
    def interfere() -> None:
        cluster.put_account("team-a", "default", [{"name": "racer"}])
        cluster.before_write["serviceaccounts"] = interfere

    cluster.before_write["serviceaccounts"] = interfere
    (result,) = env.provision(namespaces=["team-a"])
    error = result.service_accounts[0].error
    assert isinstance(error, Aborted)
    assert error.reason == KUBERNETES_CONFLICT
    assert len(env.sleeps) == Tuning().conflict_attempts - 1


def test_dry_run_writes_nothing_and_says_what_would_change(env: Env, cluster: FakeCluster) -> None:
    (result,) = env.provision(namespaces=["team-a"], dry_run=True, keep_in_sync=True)
    assert result.secret_change == SecretChange.CREATED
    assert result.service_accounts[0].change == AccountChange.PATCHED
    assert cluster.writes == []
    assert env.store.list("pullsecret-") == []


def test_a_foreign_secret_is_left_alone_and_so_are_its_accounts(
    env: Env, cluster: FakeCluster
) -> None:
    foreign = {
        "metadata": {"name": DEFAULT_SECRET_NAME, "resourceVersion": "1"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": "e30="},
    }
    cluster.secrets[("team-a", DEFAULT_SECRET_NAME)] = foreign
    results = env.provision(namespaces=["team-a", "team-b"])
    assert isinstance(results[0].error, FailedPrecondition)
    assert results[0].error.reason == "SECRET_NOT_MANAGED"
    assert cluster.secrets[("team-a", DEFAULT_SECRET_NAME)] == foreign
    assert _refs(cluster, "team-a") == []
    assert results[1].secret_change == SecretChange.CREATED  # the others go on
    revoked = env.manager.revoke(RevokeRequest(namespaces=["team-a"]), ADMIN)
    assert revoked[0].error is not None
    assert revoked[0].error.reason == "SECRET_NOT_MANAGED"
    assert ("team-a", DEFAULT_SECRET_NAME) in cluster.secrets


def test_a_forbidden_namespace_fails_alone(env: Env, cluster: FakeCluster) -> None:
    cluster.forbidden.add("team-a")
    results = env.provision(namespaces=["team-a", "team-b"])
    assert isinstance(results[0].error, PermissionDenied)
    assert 'in the namespace "team-a"' in results[0].error.message
    assert results[1].secret_change == SecretChange.CREATED


def test_unreachable_everywhere_fails_the_call(env: Env, cluster: FakeCluster) -> None:
    cluster.unreachable = True
    with pytest.raises(Unavailable) as raised:
        env.provision(namespaces=["team-a", "team-b"])
    assert raised.value.reason == KUBERNETES_UNREACHABLE


def test_the_default_service_account_is_waited_for(env: Env, cluster: FakeCluster) -> None:
    cluster.add_namespace("fresh")
    del cluster.accounts[("fresh", "default")]
    cluster.default_appears_after["fresh"] = 3
    (result,) = env.provision(namespaces=["fresh"])
    assert result.service_accounts[0].change == AccountChange.PATCHED
    assert len(env.sleeps) == 3


def test_a_default_service_account_that_never_comes_is_reported(
    env: Env, cluster: FakeCluster
) -> None:
    cluster.add_namespace("fresh")
    del cluster.accounts[("fresh", "default")]
    result, other = env.provision(namespaces=["fresh", "team-a"])
    assert not other.failed
    account = result.service_accounts[0]
    assert account.change == AccountChange.NOT_FOUND
    assert account.error is not None
    assert "waited 2 s" in account.error.message
    assert result.secret_change == SecretChange.CREATED
    assert env.clock == pytest.approx(2.0)  # bounded by the wait budget


# -- request checks, in order -------------------------------------------------------------


def test_invalid_secret_name_is_refused_without_echo(env: Env) -> None:
    with pytest.raises(InvalidArgument) as raised:
        env.provision(namespaces=["team-a"], secret_name="LK001XnotAname")
    assert raised.value.violations[0].field == "secret_name"
    assert "LK001X" not in raised.value.message


def test_targets_are_required(env: Env) -> None:
    with pytest.raises(InvalidArgument) as raised:
        env.provision()
    assert raised.value.violations[0].field == "namespaces"
    with pytest.raises(InvalidArgument) as raised:
        env.provision(namespaces=["Bad_Name"])
    assert raised.value.violations[0].field == "namespaces[0]"


def test_scope_before_existence(env: Env) -> None:
    scoped = Actor(principal="team", image_hosts=frozenset({"ghcr"}))
    with pytest.raises(PermissionDenied):
        env.provision(namespaces=["team-a"], image_hosts=["imageHosts/no-such"], actor=scoped)
    with pytest.raises(NotFound):
        env.provision(namespaces=["team-a"], image_hosts=["imageHosts/no-such"])


def test_a_scoped_principal_cannot_replace_a_secret_carrying_other_hosts(
    env: Env, cluster: FakeCluster
) -> None:
    env.host("quay", "quay.io", "q", "qq")
    env.provision(namespaces=["team-a"], image_hosts=["imageHosts/quay"])
    scoped = Actor(principal="team", image_hosts=frozenset({"ghcr"}))
    (result,) = env.provision(namespaces=["team-a"], actor=scoped)
    assert isinstance(result.error, PermissionDenied)
    assert list(env.auths("team-a")) == ["quay.io"]


def test_no_credentials_no_secret(env: Env) -> None:
    env.host("anon", "anon.example.org")
    with pytest.raises(FailedPrecondition) as raised:
        env.provision(namespaces=["team-a"], image_hosts=["imageHosts/anon"])
    assert raised.value.reason == "NO_CREDENTIALS"


def test_not_configured() -> None:
    environment = Env(None)
    environment.host("ghcr", "ghcr.io", "bot", TOKEN)
    with pytest.raises(FailedPrecondition) as raised:
        environment.provision(namespaces=["team-a"])
    assert raised.value.reason == KUBERNETES_NOT_CONFIGURED


def test_images_resolve_to_their_hosts(env: Env) -> None:
    env.host("acme", "ghcr.io/acme", "acme-bot", "tok-acme")
    outcome = env.manager.provision(
        ProvisionRequest(namespaces=["team-a"], images=["ghcr.io/acme/app:1", "ubuntu"]), ADMIN
    )
    # ubuntu resolves to the anonymous seeded Docker Hub: carried, but no entry.
    assert outcome.image_hosts == ("acme", "docker-hub")
    assert list(env.auths("team-a")) == ["ghcr.io/acme"]
    with pytest.raises(InvalidArgument) as raised:
        env.manager.provision(ProvisionRequest(namespaces=["team-a"], images=["Bad::ref"]), ADMIN)
    assert raised.value.violations[0].field == "images[0]"


# -- sync, rotation, revoke ---------------------------------------------------------------


def test_rotation_reaches_every_recorded_secret(env: Env, cluster: FakeCluster) -> None:
    env.provision(namespaces=["team-a"])
    env.provision(namespaces=["team-b"], keep_in_sync=True)
    env.catalog.update(
        "ghcr", HostFields(access_token=Secret(TOKEN_2)), ["access_token"], "", ADMIN
    )
    listed = env.manager.list_page("", 0, "", ADMIN).secrets
    assert {s.state for s in listed} == {SecretState.STALE}
    outcomes = env.manager.sync()
    assert [o.secret_change for o in outcomes] == [SecretChange.UPDATED, SecretChange.UPDATED]
    for namespace in ("team-a", "team-b"):
        assert env.auths(namespace)["ghcr.io"]["password"] == TOKEN_2
    listed = env.manager.list_page("", 0, "", ADMIN).secrets
    assert {s.state for s in listed} == {SecretState.CURRENT}
    # A deleted host leaves every secret: no stale credentials linger.
    env.catalog.delete("ghcr", "", ADMIN)
    env.manager.sync()
    assert env.auths("team-a") == {}


def test_kept_in_sync_repairs_and_new_namespaces(env: Env, cluster: FakeCluster) -> None:
    env.provision(namespace_selector="team=x", keep_in_sync=True)
    del cluster.secrets[("team-b", DEFAULT_SECRET_NAME)]
    cluster.put_account("team-a", "default", [{"name": "theirs"}])
    cluster.add_namespace("team-c", {"team": "x"})
    outcomes = {o.namespace: o for o in env.manager.sync()}
    assert outcomes["team-b"].secret_change == SecretChange.CREATED
    assert outcomes["team-a"].service_accounts[0].change == AccountChange.PATCHED
    assert outcomes["team-c"].secret_change == SecretChange.CREATED
    assert _refs(cluster, "team-a") == [{"name": "theirs"}, {"name": DEFAULT_SECRET_NAME}]
    assert ("team-c", DEFAULT_SECRET_NAME) in cluster.secrets
    assert all(not o.changed for o in env.manager.sync())  # converged


def test_revoke_keeps_other_entries_and_stops_the_reconciler(
    env: Env, cluster: FakeCluster
) -> None:
    env.provision(namespace_selector="team=x", keep_in_sync=True)
    cluster.put_account(
        "team-a", "default", [{"name": "theirs"}, {"name": DEFAULT_SECRET_NAME}, {"name": "z"}]
    )
    (result,) = env.manager.revoke(RevokeRequest(namespaces=["team-a"]), ADMIN)
    assert result.secret_change == SecretChange.DELETED
    assert result.service_accounts[0].change == AccountChange.PATCHED
    assert _refs(cluster, "team-a") == [{"name": "theirs"}, {"name": "z"}]
    assert ("team-a", DEFAULT_SECRET_NAME) not in cluster.secrets
    outcomes = env.manager.sync()
    assert [o.namespace for o in outcomes] == ["team-b"]
    assert ("team-a", DEFAULT_SECRET_NAME) not in cluster.secrets
    # Revoking the selector itself stops new namespaces too.
    env.manager.revoke(RevokeRequest(namespace_selector="team=x"), ADMIN)
    cluster.add_namespace("team-d", {"team": "x"})
    assert env.manager.sync() == []
    assert ("team-d", DEFAULT_SECRET_NAME) not in cluster.secrets


def test_errors_are_scrubbed_of_the_credentials(env: Env, cluster: FakeCluster) -> None:
    def leak() -> None:
        raise FailedPrecondition(f"Secret is invalid: data contains {TOKEN}", reason="X")

    cluster.before_write["secrets"] = leak
    (result,) = env.provision(namespaces=["team-a"])
    assert result.error is not None
    assert TOKEN not in result.error.message
    assert "[redacted]" in result.error.message


def test_broker_error_subclasses_keep_their_class_when_scrubbed(
    env: Env, cluster: FakeCluster
) -> None:
    def leak() -> None:
        raise PermissionDenied(f"no {TOKEN}", reason=KUBERNETES_FORBIDDEN)

    cluster.before_write["secrets"] = leak
    (result,) = env.provision(namespaces=["team-a"])
    assert isinstance(result.error, PermissionDenied)
    assert isinstance(result.error, BrokerError)
