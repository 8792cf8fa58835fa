"""The Kubernetes API emulator against reference/kubernetes.md, driven through the official client.

Every status code, message and body here is what a real API server answers
(see the reference and the apiserver sources it cites). The production code
talks to the emulator through the same client, so a drift from the real
server fails here first. Raw HTTP is used only where the client hides the
wire (headers, content types it refuses to send, unknown fields its models
forbid). Secret values are obviously fake.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from tests.support.k8s_emulator import (
    APPLY_PATCH,
    GENERIC_INVALID_MESSAGE,
    JSON_PATCH,
    MERGE_PATCH,
    OPTIMISTIC_LOCK_MESSAGE,
    STRATEGIC_MERGE_PATCH,
    K8sCluster,
    K8sEmulator,
)

pytestmark = pytest.mark.integration

NS = "team"
USER = "system:serviceaccount:credbroker:credbroker"
DOCKERCONFIG = {"auths": {"registry.example.com": {"username": "u", "password": "p"}}}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def emu(k8s_cluster: K8sCluster) -> K8sEmulator:
    k8s_cluster.emulator.create_namespace(NS)
    return k8s_cluster.emulator


@pytest.fixture
def core(k8s_cluster: K8sCluster, emu: K8sEmulator) -> client.CoreV1Api:
    return k8s_cluster.core_v1()


class Http:
    """Raw HTTP to the emulator, for what the client hides (headers, bodies its models refuse)."""

    def __init__(self, emulator: K8sEmulator) -> None:
        self.emulator = emulator
        self.session = requests.Session()
        self.session.trust_env = False

    def __call__(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        params: dict[str, str] | None = None,
    ) -> requests.Response:
        headers: dict[str, str] = {}
        if self.emulator.token is not None:
            headers["Authorization"] = f"Bearer {self.emulator.token}"
        if body is not None:
            data = json.dumps(body).encode()
        if content_type is not None:
            headers["Content-Type"] = content_type
        return self.session.request(
            method,
            self.emulator.url + path,
            data=data,
            headers=headers,
            params=params,
            timeout=5,
        )

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def http(emu: K8sEmulator) -> Iterator[Http]:
    raw = Http(emu)
    try:
        yield raw
    finally:
        raw.close()


def status_of(exc: ApiException) -> dict[str, Any]:
    """The Status object of a failed call, as the server sent it."""
    assert exc.body is not None
    body: dict[str, Any] = json.loads(exc.body)
    return body


def api_error(call: Callable[[], object]) -> ApiException:
    with pytest.raises(ApiException) as info:
        call()
    return info.value


def secret(name: str, **kwargs: Any) -> client.V1Secret:
    labels = kwargs.pop("labels", None)
    return client.V1Secret(metadata=client.V1ObjectMeta(name=name, labels=labels), **kwargs)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def pull_secrets(sa: client.V1ServiceAccount) -> list[str]:
    return [ref.name for ref in sa.image_pull_secrets or []]


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --------------------------------------------------------------------------- kubeconfig & transport


def test_kubeconfig_context_reaches_the_emulator_with_its_token(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    emu = k8s_cluster.emulator
    path = emu.write_kubeconfig(tmp_path / "config", context_name="other", namespace="team")
    assert path.stat().st_mode & 0o777 == 0o600
    cluster = K8sCluster(emu, path, "other")
    try:
        names = [ns.metadata.name for ns in cluster.core_v1().list_namespace().items]
    finally:
        cluster.close()
    assert names == ["default", "kube-node-lease", "kube-public", "kube-system"]
    assert all(r.token_present for r in emu.requests)


def test_a_wrong_token_is_401_unauthorized(k8s_cluster: K8sCluster) -> None:
    emu = k8s_cluster.emulator
    emu.write_kubeconfig(k8s_cluster.kubeconfig, context_name="intruder", token="nope", merge=True)
    core = k8s_cluster.core_v1(context="intruder")
    exc = api_error(core.list_namespace)
    assert exc.status == 401
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    # merge kept the fixture's context and its current-context
    assert k8s_cluster.core_v1().list_namespace().items


def test_version_and_discovery_answer(k8s_cluster: K8sCluster) -> None:
    api_client = k8s_cluster.api_client()
    assert client.VersionApi(api_client).get_code().git_version.startswith("v1.")
    assert client.CoreApi(api_client).get_api_versions().versions == ["v1"]
    resources = {r.name for r in client.CoreV1Api(api_client).get_api_resources().resources}
    assert resources == {"namespaces", "secrets", "serviceaccounts"}


def test_in_cluster_configuration_over_tls(tmp_path: Path) -> None:
    with K8sEmulator(tls_directory=tmp_path / "tls") as emu:
        files = emu.in_cluster_files(tmp_path / "sa")
        assert emu.url.startswith("https://127.0.0.1:")
        configuration = client.Configuration()
        InClusterConfigLoader(
            token_filename=str(files.token_file),
            cert_filename=str(files.ca_file),
            environ=files.environ,
        ).load_and_set(configuration)
        with client.ApiClient(configuration) as api_client:
            namespaces = client.CoreV1Api(api_client).list_namespace().items
        assert "default" in {ns.metadata.name for ns in namespaces}
        assert emu.server_errors == []


def test_stop_closes_the_port_and_joins_the_threads() -> None:
    emu = K8sEmulator().start()
    port = emu.port
    emu.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    assert not [t for t in threading.enumerate() if t.name.startswith("k8s-emulator")]


# --------------------------------------------------------------------------- CRUD


def test_namespace_crud_and_its_automatic_name_label(k8s_cluster: K8sCluster) -> None:
    core = k8s_cluster.core_v1()
    created = core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name="shop", labels={"tier": "web"}))
    )
    assert created.kind == "Namespace"
    assert created.api_version == "v1"
    assert created.metadata.labels == {"tier": "web", "kubernetes.io/metadata.name": "shop"}
    assert created.spec.finalizers == ["kubernetes"]
    assert created.status.phase == "Active"
    assert created.metadata.uid
    assert created.metadata.creation_timestamp is not None
    read = core.read_namespace("shop")
    assert read.metadata.resource_version == created.metadata.resource_version
    patched = core.patch_namespace("shop", {"metadata": {"labels": {"tier": "api"}}})
    assert patched.metadata.labels["tier"] == "api"
    assert "shop" in {ns.metadata.name for ns in core.list_namespace().items}
    again = client.V1Namespace(metadata=client.V1ObjectMeta(name="shop"))
    exc = api_error(lambda: core.create_namespace(again))
    assert exc.status == 409
    assert status_of(exc)["message"] == 'namespaces "shop" already exists'


def test_secret_crud(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_secret(NS, secret("reg", data={"a": b64("1")}))
    assert (created.kind, created.api_version, created.type) == ("Secret", "v1", "Opaque")
    assert created.metadata.namespace == NS
    assert created.metadata.uid
    assert created.metadata.resource_version
    read = core.read_namespaced_secret("reg", NS)
    assert read.data == {"a": b64("1")}
    read.data["b"] = b64("2")
    replaced = core.replace_namespaced_secret("reg", NS, read)
    assert replaced.data == {"a": b64("1"), "b": b64("2")}
    assert replaced.metadata.uid == created.metadata.uid
    deleted = core.delete_namespaced_secret("reg", NS)
    assert deleted == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": "reg", "kind": "secrets", "uid": created.metadata.uid},
    }
    assert api_error(lambda: core.read_namespaced_secret("reg", NS)).status == 404


def test_service_account_crud(core: client.CoreV1Api) -> None:
    body = client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="builder"),
        image_pull_secrets=[client.V1LocalObjectReference(name="reg")],
    )
    created = core.create_namespaced_service_account(NS, body)
    assert (created.kind, created.api_version) == ("ServiceAccount", "v1")
    assert pull_secrets(created) == ["reg"]
    created.automount_service_account_token = False
    replaced = core.replace_namespaced_service_account("builder", NS, created)
    assert replaced.automount_service_account_token is False
    listed = core.list_namespaced_service_account(NS).items
    assert {sa.metadata.name for sa in listed} == {"builder", "default"}
    core.delete_namespaced_service_account("builder", NS)
    exc = api_error(lambda: core.read_namespaced_service_account("builder", NS))
    assert exc.status == 404


def test_list_is_a_typed_list_whose_items_omit_kind(core: client.CoreV1Api, http: Http) -> None:
    core.create_namespaced_secret(NS, secret("a"))
    body = http("GET", f"/api/v1/namespaces/{NS}/secrets").json()
    assert body["kind"] == "SecretList"
    assert body["apiVersion"] == "v1"
    assert body["metadata"] == {"resourceVersion": body["metadata"]["resourceVersion"]}
    assert [set(item) for item in body["items"]] == [{"metadata", "type"}]
    listed = core.list_namespaced_secret(NS)
    assert listed.items[0].metadata.name == "a"
    assert listed.items[0].kind is None


def test_cluster_wide_lists_cover_every_namespace(core: client.CoreV1Api, emu: K8sEmulator) -> None:
    emu.create_namespace("other")
    core.create_namespaced_secret(NS, secret("a"))
    core.create_namespaced_secret("other", secret("b"))
    items = core.list_secret_for_all_namespaces().items
    assert [(s.metadata.namespace, s.metadata.name) for s in items] == [("other", "b"), (NS, "a")]
    accounts = core.list_service_account_for_all_namespaces().items
    assert {(sa.metadata.namespace, sa.metadata.name) for sa in accounts} >= {
        ("other", "default"),
        (NS, "default"),
        ("kube-system", "default"),
    }


def test_list_in_a_missing_namespace_is_empty_but_create_is_404(core: client.CoreV1Api) -> None:
    assert core.list_namespaced_secret("nowhere").items == []
    exc = api_error(lambda: core.create_namespaced_secret("nowhere", secret("a")))
    assert exc.status == 404
    assert status_of(exc)["message"] == 'namespaces "nowhere" not found'


def test_limit_and_continue_page_through_a_list(core: client.CoreV1Api) -> None:
    for name in ("a", "b", "c"):
        core.create_namespaced_secret(NS, secret(name))
    first = core.list_namespaced_secret(NS, limit=2)
    assert [s.metadata.name for s in first.items] == ["a", "b"]
    assert first.metadata.remaining_item_count == 1
    rest = core.list_namespaced_secret(NS, limit=2, _continue=first.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["c"]
    assert rest.metadata._continue is None


def test_generate_name_makes_a_name(core: client.CoreV1Api) -> None:
    body = client.V1Secret(metadata=client.V1ObjectMeta(generate_name="pull-"))
    created = core.create_namespaced_secret(NS, body)
    assert created.metadata.name.startswith("pull-")
    assert len(created.metadata.name) == len("pull-") + 5


def test_post_of_an_object_with_a_resource_version_is_refused(core: client.CoreV1Api) -> None:
    read = core.create_namespaced_secret(NS, secret("a"))
    read.metadata.name = "b"
    read.metadata.uid = None
    exc = api_error(lambda: core.create_namespaced_secret(NS, read))
    assert exc.status == 500
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "resourceVersion should not be set on objects to be created",
        "code": 500,
    }


# --------------------------------------------------------------------------- resourceVersion


def test_resource_version_moves_on_every_write(core: client.CoreV1Api, emu: K8sEmulator) -> None:
    seen = [emu.resource_version]
    created = core.create_namespaced_secret(NS, secret("a"))
    seen.append(created.metadata.resource_version)
    created.data = {"k": b64("v")}
    replaced = core.replace_namespaced_secret("a", NS, created)
    seen.append(replaced.metadata.resource_version)
    patched = core.patch_namespaced_secret("a", NS, {"data": {"k": b64("w")}})
    seen.append(patched.metadata.resource_version)
    assert [int(rv) for rv in seen] == sorted({int(rv) for rv in seen})
    assert emu.resource_version == patched.metadata.resource_version
    assert emu.get_object("secrets", NS, "a") is not None
    core.delete_namespaced_secret("a", NS)
    assert int(emu.resource_version) > int(patched.metadata.resource_version)


def test_a_no_op_update_keeps_the_resource_version(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_secret(NS, secret("a", data={"k": b64("v")}))
    same = core.replace_namespaced_secret("a", NS, created)
    assert same.metadata.resource_version == created.metadata.resource_version
    patched = core.patch_namespaced_secret("a", NS, {"data": {"k": b64("v")}})
    assert patched.metadata.resource_version == created.metadata.resource_version


def test_stale_put_is_409_conflict(core: client.CoreV1Api) -> None:
    first = core.create_namespaced_secret(NS, secret("a"))
    first.data = {"k": b64("1")}
    core.replace_namespaced_secret("a", NS, first)  # first's resourceVersion is now stale
    first.data = {"k": b64("2")}
    exc = api_error(lambda: core.replace_namespaced_secret("a", NS, first))
    assert exc.status == 409
    assert exc.reason == "Conflict"
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'Operation cannot be fulfilled on secrets "a": {OPTIMISTIC_LOCK_MESSAGE}',
        "reason": "Conflict",
        "details": {"name": "a", "kind": "secrets"},
        "code": 409,
    }


def test_put_without_resource_version_is_unconditional(core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("a"))
    replaced = core.replace_namespaced_secret("a", NS, secret("a", data={"k": b64("x")}))
    assert replaced.data == {"k": b64("x")}


def test_put_of_a_missing_object_is_404(core: client.CoreV1Api) -> None:
    exc = api_error(lambda: core.replace_namespaced_secret("ghost", NS, secret("ghost")))
    assert exc.status == 404
    assert status_of(exc)["message"] == 'secrets "ghost" not found'


def test_put_with_another_name_is_400(core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("a"))
    exc = api_error(lambda: core.replace_namespaced_secret("a", NS, secret("b")))
    assert exc.status == 400
    assert status_of(exc)["message"] == (
        "the name of the object (b) does not match the name on the URL (a)"
    )


def test_a_write_between_read_and_put_forces_a_409_and_a_reread_wins(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    """The safe read-modify-PUT loop of the reference, raced by another writer."""
    sa = core.read_namespaced_service_account("default", NS)

    def other_writer() -> None:
        emu.mutate_object(
            "serviceaccounts",
            NS,
            "default",
            lambda obj: obj.setdefault("imagePullSecrets", []).append({"name": "theirs"}),
        )

    emu.before_write(other_writer, kind="serviceaccounts", namespace=NS, name="default")
    sa.image_pull_secrets = [client.V1LocalObjectReference(name="ours")]
    exc = api_error(lambda: core.replace_namespaced_service_account("default", NS, sa))
    assert exc.status == 409
    again = core.read_namespaced_service_account("default", NS)
    again.image_pull_secrets = [
        *again.image_pull_secrets,
        client.V1LocalObjectReference(name="ours"),
    ]
    done = core.replace_namespaced_service_account("default", NS, again)
    assert pull_secrets(done) == ["theirs", "ours"]


def test_bump_resource_version_makes_held_versions_stale(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    held = core.create_namespaced_secret(NS, secret("a"))
    new_rv = emu.bump_resource_version("secrets", NS, "a")
    assert int(new_rv) > int(held.metadata.resource_version)
    assert api_error(lambda: core.replace_namespaced_secret("a", NS, held)).status == 409


def test_delete_preconditions_conflict(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_secret(NS, secret("a"))
    options = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version="1"))
    exc = api_error(lambda: core.delete_namespaced_secret("a", NS, body=options))
    assert exc.status == 409
    assert status_of(exc)["message"] == (
        'Operation cannot be fulfilled on secrets "a": Precondition failed: ResourceVersion in '
        f"precondition: 1, ResourceVersion in object meta: {created.metadata.resource_version}"
    )


# --------------------------------------------------------------------------- patches


def test_client_default_content_types(core: client.CoreV1Api, emu: K8sEmulator) -> None:
    """The reference: POST/PUT carry none, a list body is a JSON patch, a dict a strategic one."""
    emu.clear_requests()
    created = core.create_namespaced_secret(NS, secret("a"))
    core.replace_namespaced_secret("a", NS, created)
    core.patch_namespaced_secret("a", NS, {"metadata": {"labels": {"x": "1"}}})
    core.patch_namespaced_secret("a", NS, [{"op": "add", "path": "/data", "value": {}}])
    core.patch_namespaced_secret("a", NS, {"data": None}, _content_type=MERGE_PATCH)
    sent = [(r.method, r.content_type) for r in emu.requests]
    assert sent == [
        ("POST", None),
        ("PUT", None),
        ("PATCH", STRATEGIC_MERGE_PATCH),
        ("PATCH", JSON_PATCH),
        ("PATCH", MERGE_PATCH),
    ]
    assert emu.requests[0].json() == {"metadata": {"name": "a"}}


def test_json_patch_guarded_by_a_passing_test_op(core: client.CoreV1Api) -> None:
    sa = core.read_namespaced_service_account("default", NS)
    patch = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": sa.metadata.resource_version},
        {"op": "add", "path": "/imagePullSecrets", "value": [{"name": "reg"}]},
    ]
    patched = core.patch_namespaced_service_account("default", NS, patch)
    assert pull_secrets(patched) == ["reg"]
    patch = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": patched.metadata.resource_version,
        },
        {"op": "add", "path": "/imagePullSecrets/-", "value": {"name": "reg2"}},
    ]
    again = core.patch_namespaced_service_account("default", NS, patch)
    assert pull_secrets(again) == ["reg", "reg2"]


def test_json_patch_with_a_failing_test_op_is_422_with_the_generic_message(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    sa = core.read_namespaced_service_account("default", NS)
    emu.bump_resource_version("serviceaccounts", NS, "default")
    patch = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": sa.metadata.resource_version},
        {"op": "add", "path": "/imagePullSecrets", "value": [{"name": "reg"}]},
    ]
    before = emu.resource_version
    exc = api_error(lambda: core.patch_namespaced_service_account("default", NS, patch))
    assert exc.status == 422
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": GENERIC_INVALID_MESSAGE,
        "reason": "Invalid",
        "details": {},
        "code": 422,
    }
    assert emu.resource_version == before


def test_json_patch_append_to_an_absent_list_fails_but_adding_the_list_works(
    core: client.CoreV1Api,
) -> None:
    append = [{"op": "add", "path": "/imagePullSecrets/-", "value": {"name": "reg"}}]
    exc = api_error(lambda: core.patch_namespaced_service_account("default", NS, append))
    assert exc.status == 422
    assert status_of(exc)["message"] == GENERIC_INVALID_MESSAGE
    create = [{"op": "add", "path": "/imagePullSecrets", "value": [{"name": "reg"}]}]
    assert pull_secrets(core.patch_namespaced_service_account("default", NS, create)) == ["reg"]


def test_json_patch_operations(core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("a", data={"x": b64("1"), "y": b64("2")}))
    patch = [
        {"op": "copy", "from": "/data/x", "path": "/data/z"},
        {"op": "move", "from": "/data/y", "path": "/data/w"},
        {"op": "replace", "path": "/data/x", "value": b64("9")},
        {"op": "remove", "path": "/data/z"},
        {"op": "add", "path": "/metadata/labels", "value": {"a~b/c": "d"}},
        {"op": "remove", "path": "/metadata/labels/a~0b~1c"},
    ]
    patched = core.patch_namespaced_secret("a", NS, patch)
    assert patched.data == {"x": b64("9"), "w": b64("2")}
    assert patched.metadata.labels is None
    for bad in (
        [{"op": "remove", "path": "/data/missing"}],
        [{"op": "replace", "path": "/nothing", "value": 1}],
        [{"op": "add", "path": "/metadata/labels/x", "value": "y"}],
        [{"op": "frobnicate", "path": "/data"}],
    ):
        assert api_error(lambda b=bad: core.patch_namespaced_secret("a", NS, b)).status == 422


@pytest.mark.parametrize("content_type", [STRATEGIC_MERGE_PATCH, MERGE_PATCH])
def test_object_patches_replace_the_whole_image_pull_secrets_list(
    core: client.CoreV1Api, emu: K8sEmulator, content_type: str
) -> None:
    """The behaviour the production code must avoid: another writer's entry is lost."""
    core.patch_namespaced_service_account(
        "default", NS, {"imagePullSecrets": [{"name": "ours"}]}, _content_type=content_type
    )
    emu.mutate_object(
        "serviceaccounts",
        NS,
        "default",
        lambda obj: obj["imagePullSecrets"].append({"name": "theirs"}),
    )
    patched = core.patch_namespaced_service_account(
        "default",
        NS,
        {"imagePullSecrets": [{"name": "ours"}, {"name": "new"}]},
        _content_type=content_type,
    )
    assert pull_secrets(patched) == ["ours", "new"]
    assert emu.requests[-1].content_type == content_type


def test_strategic_merge_merges_maps_and_keyed_lists(core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("a", data={"x": b64("1")}, labels={"k": "v"}))
    patched = core.patch_namespaced_secret(
        "a", NS, {"data": {"y": b64("2")}, "metadata": {"labels": {"k": None, "n": "m"}}}
    )
    assert patched.data == {"x": b64("1"), "y": b64("2")}
    assert patched.metadata.labels == {"n": "m"}
    sa = core.patch_namespaced_service_account(
        "default", NS, {"secrets": [{"name": "s1"}], "metadata": {"finalizers": ["a"]}}
    )
    sa = core.patch_namespaced_service_account(
        "default", NS, {"secrets": [{"name": "s2"}], "metadata": {"finalizers": ["b"]}}
    )
    assert [ref.name for ref in sa.secrets] == ["s1", "s2"]  # patchMergeKey "name"
    assert sa.metadata.finalizers == ["a", "b"]  # patchStrategy merge on a scalar list
    sa = core.patch_namespaced_service_account(
        "default", NS, {"secrets": [{"name": "s1", "$patch": "delete"}]}
    )
    assert [ref.name for ref in sa.secrets] == ["s2"]


@pytest.mark.parametrize("content_type", [STRATEGIC_MERGE_PATCH, MERGE_PATCH])
def test_a_stale_resource_version_inside_a_patch_is_409(
    core: client.CoreV1Api, emu: K8sEmulator, content_type: str
) -> None:
    sa = core.read_namespaced_service_account("default", NS)
    emu.bump_resource_version("serviceaccounts", NS, "default")
    body = {
        "metadata": {"resourceVersion": sa.metadata.resource_version},
        "imagePullSecrets": [{"name": "reg"}],
    }
    exc = api_error(
        lambda: core.patch_namespaced_service_account(
            "default", NS, body, _content_type=content_type
        )
    )
    assert exc.status == 409
    assert status_of(exc)["message"] == (
        f'Operation cannot be fulfilled on serviceaccounts "default": {OPTIMISTIC_LOCK_MESSAGE}'
    )
    fresh = core.read_namespaced_service_account("default", NS)
    body["metadata"] = {"resourceVersion": fresh.metadata.resource_version}
    patched = core.patch_namespaced_service_account("default", NS, body, _content_type=content_type)
    assert pull_secrets(patched) == ["reg"]


def test_patch_of_a_missing_object_is_404(core: client.CoreV1Api) -> None:
    for body in ({"data": {}}, [{"op": "add", "path": "/data", "value": {}}]):
        exc = api_error(lambda b=body: core.patch_namespaced_secret("ghost", NS, b))
        assert exc.status == 404
        assert status_of(exc)["message"] == 'secrets "ghost" not found'


def test_another_patch_content_type_is_415(http: Http, core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("a"))
    answer = http(
        "PATCH", f"/api/v1/namespaces/{NS}/secrets/a", body={}, content_type="application/json"
    )
    assert answer.status_code == 415
    assert answer.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "the body of the request was in an unknown format - accepted media types "
        "include: application/json-patch+json, application/merge-patch+json, "
        "application/strategic-merge-patch+json, application/apply-patch+yaml",
        "reason": "UnsupportedMediaType",
        "code": 415,
    }


def test_apply_needs_a_field_manager(core: client.CoreV1Api) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}}
    exc = api_error(lambda: core.patch_namespaced_secret("a", NS, body, _content_type=APPLY_PATCH))
    # The brief guessed 400; ValidatePatchOptions makes it a 422 Invalid on PatchOptions.
    assert exc.status == 422
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
        "is required for apply patch",
        "reason": "Invalid",
        "details": {
            "group": "meta.k8s.io",
            "kind": "PatchOptions",
            "causes": [
                {
                    "reason": "FieldValueRequired",
                    "message": "Required value: is required for apply patch",
                    "field": "fieldManager",
                }
            ],
        },
        "code": 422,
    }


def test_apply_creates_then_merges(core: client.CoreV1Api, http: Http) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "a"},
        "data": {"x": b64("1")},
    }
    created = core.patch_namespaced_secret(
        "a", NS, body, field_manager="credbroker", _content_type=APPLY_PATCH
    )
    assert created.data == {"x": b64("1")}
    yaml_body = b"apiVersion: v1\nkind: Secret\nmetadata:\n  name: a\nstringData:\n  y: two\n"
    answer = http(
        "PATCH",
        f"/api/v1/namespaces/{NS}/secrets/a",
        data=yaml_body,
        content_type=APPLY_PATCH,
        params={"fieldManager": "credbroker", "force": "true"},
    )
    assert answer.status_code == 200
    assert answer.json()["data"] == {"x": b64("1"), "y": b64("two")}


# --------------------------------------------------------------------------- dry run


def test_dry_run_all_answers_as_if_done_but_changes_nothing(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    core.create_namespaced_secret(NS, secret("kept", data={"k": b64("v")}))
    before_rv = emu.resource_version
    before = emu.get_object("secrets", NS, "kept")

    created = core.create_namespaced_secret(NS, secret("new"), dry_run="All")
    assert created.metadata.uid
    assert created.metadata.creation_timestamp is not None
    assert created.metadata.resource_version is None
    replaced = core.replace_namespaced_secret(
        "kept", NS, secret("kept", data={"k": b64("other")}), dry_run="All"
    )
    assert replaced.data == {"k": b64("other")}
    assert replaced.metadata.resource_version == before_rv
    patched = core.patch_namespaced_secret("kept", NS, {"data": {"z": b64("1")}}, dry_run="All")
    assert set(patched.data) == {"k", "z"}
    core.patch_namespaced_secret("kept", NS, [{"op": "remove", "path": "/data"}], dry_run="All")
    deleted = core.delete_namespaced_secret("kept", NS, dry_run="All")
    assert deleted["status"] == "Success"
    terminating = core.delete_namespace(NS, dry_run="All")
    assert terminating["status"]["phase"] == "Terminating"

    assert emu.resource_version == before_rv
    assert emu.get_object("secrets", NS, "kept") == before
    assert emu.get_object("secrets", NS, "new") is None
    assert core.read_namespace(NS).status.phase == "Active"


def test_dry_run_still_validates(core: client.CoreV1Api) -> None:
    bad = secret("a", type="kubernetes.io/dockerconfigjson")
    exc = api_error(lambda: core.create_namespaced_secret(NS, bad, dry_run="All"))
    assert exc.status == 422


def test_an_unknown_dry_run_value_is_refused(http: Http) -> None:
    answer = http(
        "POST",
        f"/api/v1/namespaces/{NS}/secrets",
        body={"metadata": {"name": "a"}},
        params={"dryRun": "Some"},
    )
    assert answer.status_code == 422
    assert answer.json()["message"] == (
        'CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: "Some": '
        'supported values: "All"'
    )


# --------------------------------------------------------------------------- selectors


@pytest.fixture
def labelled(core: client.CoreV1Api) -> client.CoreV1Api:
    for name, labels in (
        ("a", {"app": "web", "tier": "front", "n": "3"}),
        ("b", {"app": "db", "tier": "back", "n": "10"}),
        ("c", {"app": "web"}),
        ("d", None),
    ):
        core.create_namespaced_secret(NS, secret(name, labels=labels))
    return core


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", ["a", "c"]),
        ("app==web", ["a", "c"]),
        ("app!=web", ["b", "d"]),
        ("tier in (front, back)", ["a", "b"]),
        ("tier notin (front)", ["b", "c", "d"]),
        ("tier", ["a", "b"]),
        ("!tier", ["c", "d"]),
        ("app=web,tier", ["a"]),
        ("app in (web),!tier", ["c"]),
        ("n>5", ["b"]),
        ("n<5", ["a"]),
        ("", ["a", "b", "c", "d"]),
    ],
)
def test_label_selectors(labelled: client.CoreV1Api, selector: str, expected: list[str]) -> None:
    items = labelled.list_namespaced_secret(NS, label_selector=selector).items
    assert [s.metadata.name for s in items] == expected


@pytest.mark.parametrize("selector", ["a=b=c", "in (x", "app in ()", "bad key!=x", "app,", "a=b ,"])
def test_a_malformed_label_selector_is_400(labelled: client.CoreV1Api, selector: str) -> None:
    exc = api_error(lambda: labelled.list_namespaced_secret(NS, label_selector=selector))
    assert exc.status == 400
    assert status_of(exc)["reason"] == "BadRequest"


def test_field_selectors(labelled: client.CoreV1Api) -> None:
    items = labelled.list_namespaced_secret(NS, field_selector="metadata.name=b").items
    assert [s.metadata.name for s in items] == ["b"]
    items = labelled.list_namespaced_secret(
        NS, field_selector="metadata.name!=b,type=Opaque", label_selector="app=web"
    ).items
    assert [s.metadata.name for s in items] == ["a", "c"]
    exc = api_error(lambda: labelled.list_namespaced_secret(NS, field_selector="data.x=1"))
    assert exc.status == 400
    assert status_of(exc)["message"] == "field label not supported: data.x"


def test_delete_collection_by_label(labelled: client.CoreV1Api) -> None:
    labelled.delete_collection_namespaced_secret(NS, label_selector="app=web")
    names = [s.metadata.name for s in labelled.list_namespaced_secret(NS).items]
    assert names == ["b", "d"]


# --------------------------------------------------------------------------- Status bodies


def test_not_found_and_already_exists_bodies(core: client.CoreV1Api) -> None:
    exc = api_error(lambda: core.read_namespaced_secret("x", NS))
    assert (exc.status, exc.reason) == (404, "Not Found")
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'secrets "x" not found',
        "reason": "NotFound",
        "details": {"name": "x", "kind": "secrets"},
        "code": 404,
    }
    core.create_namespaced_secret(NS, secret("x"))
    exc = api_error(lambda: core.create_namespaced_secret(NS, secret("x")))
    assert exc.status == 409
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'secrets "x" already exists',
        "reason": "AlreadyExists",
        "details": {"name": "x", "kind": "secrets"},
        "code": 409,
    }


def test_an_unknown_path_is_a_plain_404_and_a_wrong_method_405(http: Http) -> None:
    answer = http("GET", f"/api/v1/namespaces/{NS}/configmaps")
    assert (answer.status_code, answer.text) == (404, "404 page not found\n")
    answer = http("POST", f"/api/v1/namespaces/{NS}/secrets/x", body={})
    assert answer.status_code == 405
    assert answer.json()["reason"] == "MethodNotAllowed"


# --------------------------------------------------------------------------- namespaces' life


def test_the_default_service_account_appears_after_its_namespace(
    k8s_cluster: K8sCluster,
) -> None:
    emu = k8s_cluster.emulator
    assert emu.default_sa_delay == 0.5
    core = k8s_cluster.core_v1()
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="fresh")))
    exc = api_error(lambda: core.read_namespaced_service_account("default", "fresh"))
    assert exc.status == 404
    assert status_of(exc)["message"] == 'serviceaccounts "default" not found'

    def present() -> bool:
        try:
            core.read_namespaced_service_account("default", "fresh")
        except ApiException as error:
            if error.status != 404:
                raise
            return False
        return True

    wait_until(present)


def test_the_default_service_account_comes_back_after_deletion(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    emu.default_sa_delay = 0.0
    core.delete_namespaced_service_account("default", NS)
    assert core.read_namespaced_service_account("default", NS).metadata.name == "default"


def test_create_namespace_control_sets_labels_and_default_account(emu: K8sEmulator) -> None:
    made = emu.create_namespace("labelled", labels={"team": "a"}, default_service_account="never")
    assert made["metadata"]["labels"] == {"team": "a", "kubernetes.io/metadata.name": "labelled"}
    assert emu.get_object("serviceaccounts", "labelled", "default") is None
    emu.create_namespace("later", default_service_account="delayed")
    assert emu.get_object("serviceaccounts", "later", "default") is None
    emu.settle()
    assert emu.get_object("serviceaccounts", "later", "default") is not None


def test_a_terminating_namespace_refuses_new_content_then_disappears(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    emu.termination_delay = 30.0  # settle() ends it below: no timing in this test
    core.create_namespaced_secret(NS, secret("old"))
    answer = core.delete_namespace(NS)
    assert answer["kind"] == "Namespace"
    assert answer["status"]["phase"] == "Terminating"
    assert answer["metadata"]["deletionTimestamp"]
    read = core.read_namespace(NS)
    assert read.status.phase == "Terminating"
    assert read.metadata.deletion_timestamp is not None

    exc = api_error(lambda: core.create_namespaced_secret(NS, secret("new")))
    assert exc.status == 403
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'secrets "new" is forbidden: unable to create new content in namespace '
        f"{NS} because it is being terminated",
        "reason": "Forbidden",
        "details": {
            "name": "new",
            "kind": "secrets",
            "causes": [
                {
                    "reason": "NamespaceTerminating",
                    "message": f"namespace {NS} is being terminated",
                    "field": "metadata.namespace",
                }
            ],
        },
        "code": 403,
    }
    # the content that was there still reads and updates until the purge
    assert core.read_namespaced_secret("old", NS).metadata.name == "old"
    exc = api_error(lambda: core.delete_namespace(NS))
    assert exc.status == 409
    assert status_of(exc)["message"] == (
        f'Operation cannot be fulfilled on namespaces "{NS}": The system is ensuring all content '
        "is removed from this namespace.  Upon completion, this namespace will automatically be "
        "purged by the system."
    )

    assert core.read_namespace(NS).status.phase == "Terminating"
    emu.settle()  # the namespace controller's work, done now instead of after the delay
    exc = api_error(lambda: core.read_namespace(NS))
    assert exc.status == 404
    assert api_error(lambda: core.read_namespaced_secret("old", NS)).status == 404
    assert emu.list_objects("secrets", NS) == []


def test_a_deleted_namespace_is_purged_after_the_termination_delay(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    emu.termination_delay = 0.1
    core.delete_namespace(NS)

    def gone() -> bool:
        try:
            core.read_namespace(NS)
        except ApiException as error:
            if error.status != 404:
                raise
            return True
        return False

    wait_until(gone)


def test_system_namespaces_cannot_be_deleted(core: client.CoreV1Api) -> None:
    exc = api_error(lambda: core.delete_namespace("kube-system"))
    assert exc.status == 403
    assert status_of(exc)["message"] == (
        'namespaces "kube-system" is forbidden: this namespace may not be deleted'
    )


def test_namespace_names_are_dns_labels(core: client.CoreV1Api) -> None:
    body = client.V1Namespace(metadata=client.V1ObjectMeta(name="Not.A.Label"))
    exc = api_error(lambda: core.create_namespace(body))
    assert exc.status == 422
    assert status_of(exc)["message"].startswith(
        'Namespace "Not.A.Label" is invalid: metadata.name: Invalid value: "Not.A.Label": '
        "a lowercase RFC 1123 label must consist of"
    )


# --------------------------------------------------------------------------- authorization


def forbidden_message(verb: str, resource: str, name: str | None, where: str) -> str:
    prefix = f'{resource} "{name}"' if name else resource
    return (
        f'{prefix} is forbidden: User "{USER}" cannot {verb} resource "{resource}" '
        f'in API group "" {where}'
    )


@pytest.mark.parametrize(
    ("verb", "name", "call"),
    [
        ("get", "a", lambda c: c.read_namespaced_secret("a", NS)),
        ("list", None, lambda c: c.list_namespaced_secret(NS)),
        ("create", None, lambda c: c.create_namespaced_secret(NS, secret("b"))),
        ("update", "a", lambda c: c.replace_namespaced_secret("a", NS, secret("a"))),
        ("patch", "a", lambda c: c.patch_namespaced_secret("a", NS, {"data": {}})),
        ("delete", "a", lambda c: c.delete_namespaced_secret("a", NS)),
    ],
)
def test_a_forbidden_namespace_answers_403_with_rbac_wording(
    core: client.CoreV1Api,
    emu: K8sEmulator,
    verb: str,
    name: str | None,
    call: Callable[[client.CoreV1Api], object],
) -> None:
    core.create_namespaced_secret(NS, secret("a"))
    emu.forbid_namespace(NS)
    exc = api_error(lambda: call(core))
    assert (exc.status, exc.reason) == (403, "Forbidden")
    details: dict[str, str] = {"name": name, "kind": "secrets"} if name else {"kind": "secrets"}
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": forbidden_message(verb, "secrets", name, f'in the namespace "{NS}"'),
        "reason": "Forbidden",
        "details": details,
        "code": 403,
    }
    emu.clear_forbidden()
    assert core.read_namespaced_secret("a", NS).metadata.name == "a"


def test_forbidding_selected_verbs_and_the_cluster_scope(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    emu.forbid_namespace(NS, verbs=["patch"], resources=["serviceaccounts"])
    assert core.read_namespaced_service_account("default", NS).metadata.name == "default"
    exc = api_error(lambda: core.patch_namespaced_service_account("default", NS, {}))
    assert status_of(exc)["message"] == forbidden_message(
        "patch", "serviceaccounts", "default", f'in the namespace "{NS}"'
    )
    assert core.read_namespace(NS).metadata.name == NS  # other resources stay allowed
    emu.forbid_cluster_scope(verbs=["list"])
    exc = api_error(core.list_secret_for_all_namespaces)
    assert status_of(exc)["message"] == forbidden_message(
        "list", "secrets", None, "at the cluster scope"
    )
    emu.forbid_namespace("kube-system", resources=["namespaces"])
    exc = api_error(lambda: core.read_namespace("kube-system"))
    assert status_of(exc)["message"] == forbidden_message(
        "get", "namespaces", "kube-system", 'in the namespace "kube-system"'
    )


# --------------------------------------------------------------------------- secrets


def test_string_data_is_merged_into_data_and_never_returned(
    core: client.CoreV1Api, http: Http
) -> None:
    created = core.create_namespaced_secret(
        NS, secret("a", data={"k": b64("old"), "x": b64("1")}, string_data={"k": "new"})
    )
    assert created.data == {"k": b64("new"), "x": b64("1")}
    assert created.string_data is None
    patched = core.patch_namespaced_secret("a", NS, {"stringData": {"y": "2"}})
    assert patched.data == {"k": b64("new"), "x": b64("1"), "y": b64("2")}
    raw = http("GET", f"/api/v1/namespaces/{NS}/secrets/a").json()
    assert "stringData" not in raw


def test_bad_base64_in_data_is_400(core: client.CoreV1Api) -> None:
    exc = api_error(lambda: core.create_namespaced_secret(NS, secret("a", data={"k": "%%"})))
    assert exc.status == 400
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'Secret in version "v1" cannot be handled as a Secret: illegal base64 data '
        "at input byte 0",
        "reason": "BadRequest",
        "code": 400,
    }
    exc = api_error(lambda: core.create_namespaced_secret(NS, secret("a", data={"k": "YWJjZA"})))
    assert status_of(exc)["message"].endswith("illegal base64 data at input byte 4")


def test_dockerconfigjson_needs_its_key_holding_json(core: client.CoreV1Api) -> None:
    kind = "kubernetes.io/dockerconfigjson"
    exc = api_error(lambda: core.create_namespaced_secret(NS, secret("a", type=kind)))
    assert exc.status == 422
    assert status_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'Secret "a" is invalid: data[.dockerconfigjson]: Required value',
        "reason": "Invalid",
        "details": {
            "name": "a",
            "kind": "Secret",
            "causes": [
                {
                    "reason": "FieldValueRequired",
                    "message": "Required value",
                    "field": "data[.dockerconfigjson]",
                }
            ],
        },
        "code": 422,
    }
    not_json = secret("a", type=kind, data={".dockerconfigjson": b64("not json")})
    exc = api_error(lambda: core.create_namespaced_secret(NS, not_json))
    assert exc.status == 422
    assert status_of(exc)["message"] == (
        'Secret "a" is invalid: data[.dockerconfigjson]: Invalid value: '
        "\"<secret contents redacted>\": invalid character 'o' in literal null (expecting 'u')"
    )
    assert "\\u003csecret contents redacted\\u003e" in (exc.body or "")  # Go's HTML escaping
    good = secret("a", type=kind, string_data={".dockerconfigjson": json.dumps(DOCKERCONFIG)})
    created = core.create_namespaced_secret(NS, good)
    decoded = base64.b64decode(created.data[".dockerconfigjson"])
    assert json.loads(decoded) == DOCKERCONFIG


def test_secret_type_is_immutable(core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("a", data={".dockerconfigjson": b64("{}")}))
    exc = api_error(
        lambda: core.patch_namespaced_secret("a", NS, {"type": "kubernetes.io/dockerconfigjson"})
    )
    assert exc.status == 422
    assert status_of(exc)["message"] == (
        'Secret "a" is invalid: type: Invalid value: "kubernetes.io/dockerconfigjson": '
        "field is immutable"
    )
    assert status_of(exc)["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": 'Invalid value: "kubernetes.io/dockerconfigjson": field is immutable',
            "field": "type",
        }
    ]


def test_a_put_without_type_defaults_to_opaque_and_hits_the_immutable_type(
    core: client.CoreV1Api,
) -> None:
    kind = "kubernetes.io/dockerconfigjson"
    created = core.create_namespaced_secret(
        NS, secret("a", type=kind, data={".dockerconfigjson": b64("{}")})
    )
    created.type = None
    exc = api_error(lambda: core.replace_namespaced_secret("a", NS, created))
    assert exc.status == 422
    assert 'type: Invalid value: "Opaque": field is immutable' in status_of(exc)["message"]


def test_an_immutable_secret_refuses_data_changes(core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("a", data={"k": b64("v")}, immutable=True))
    exc = api_error(lambda: core.patch_namespaced_secret("a", NS, {"data": {"k": b64("w")}}))
    assert exc.status == 422
    assert status_of(exc)["message"] == (
        'Secret "a" is invalid: data: Forbidden: field is immutable when `immutable` is set'
    )
    exc = api_error(lambda: core.patch_namespaced_secret("a", NS, {"immutable": False}))
    assert status_of(exc)["details"]["causes"][0]["field"] == "immutable"
    labelled = core.patch_namespaced_secret("a", NS, {"metadata": {"labels": {"ok": "yes"}}})
    assert labelled.metadata.labels == {"ok": "yes"}


def test_label_values_are_at_most_63_characters(core: client.CoreV1Api) -> None:
    digest = "ab" * 32  # a sha256 hex digest: 64 characters
    exc = api_error(lambda: core.create_namespaced_secret(NS, secret("a", labels={"sha": digest})))
    assert exc.status == 422
    assert status_of(exc)["message"] == (
        f'Secret "a" is invalid: metadata.labels: Invalid value: "{digest}": '
        "must be no more than 63 characters"
    )
    kept = client.V1Secret(metadata=client.V1ObjectMeta(name="a", annotations={"sha": digest}))
    assert core.create_namespaced_secret(NS, kept).metadata.annotations == {"sha": digest}


def test_several_invalid_fields_aggregate(core: client.CoreV1Api) -> None:
    body = secret("Bad_Name", type="kubernetes.io/tls")
    exc = api_error(lambda: core.create_namespaced_secret(NS, body))
    status = status_of(exc)
    assert status["message"].startswith('Secret "Bad_Name" is invalid: [metadata.name: ')
    assert [c["field"] for c in status["details"]["causes"]] == [
        "metadata.name",
        "data[tls.key]",
        "data[tls.crt]",
    ]


# --------------------------------------------------------------------------- unknown fields


def test_unknown_fields_are_dropped_with_a_warning(http: Http, emu: K8sEmulator) -> None:
    body = {"metadata": {"name": "a", "colour": "red"}, "extra": 1, "type": "Opaque"}
    answer = http("POST", f"/api/v1/namespaces/{NS}/secrets", body=body)
    assert answer.status_code == 201
    warnings = answer.raw.headers.getlist("Warning")
    assert warnings == [
        '299 - "unknown field \\"metadata.colour\\""',
        '299 - "unknown field \\"extra\\""',
    ]
    stored = emu.get_object("secrets", NS, "a")
    assert stored is not None
    assert "extra" not in stored
    assert "colour" not in stored["metadata"]


def test_unknown_fields_with_strict_validation_are_400(http: Http) -> None:
    answer = http(
        "POST",
        f"/api/v1/namespaces/{NS}/secrets",
        body={"metadata": {"name": "a"}, "extra": 1},
        params={"fieldValidation": "Strict"},
    )
    assert answer.status_code == 400
    assert answer.json()["message"] == (
        'Secret in version "v1" cannot be handled as a Secret: strict decoding error: '
        'unknown field "extra"'
    )


def test_a_patch_adding_unknown_fields_warns_through_the_client(core: client.CoreV1Api) -> None:
    _, status, headers = core.patch_namespaced_service_account_with_http_info(
        "default", NS, {"imagePullSecrets": [{"name": "reg", "namespace": "x"}]}
    )
    assert status == 200
    assert headers.getlist("Warning") == [
        '299 - "unknown field \\"imagePullSecrets[0].namespace\\""'
    ]


def test_a_post_body_is_json_without_content_type_and_yaml_when_declared(http: Http) -> None:
    answer = http("POST", f"/api/v1/namespaces/{NS}/secrets", data=b'{"metadata":{"name":"a"}}')
    assert answer.status_code == 201
    yaml_body = b"metadata:\n  name: b\nstringData:\n  k: v\n"
    answer = http(
        "POST", f"/api/v1/namespaces/{NS}/secrets", data=yaml_body, content_type="application/yaml"
    )
    assert answer.status_code == 201
    assert answer.json()["data"] == {"k": b64("v")}
    answer = http("POST", f"/api/v1/namespaces/{NS}/secrets", data=b"x", content_type="text/plain")
    assert answer.status_code == 415


# --------------------------------------------------------------------------- test controls


def test_injected_status_faults_hit_the_next_requests(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    fault = emu.inject(path_regex=r"/secrets$", method="GET", status=500, count=2)
    for _ in range(2):
        exc = api_error(lambda: core.list_namespaced_secret(NS))
        assert exc.status == 500
        assert status_of(exc)["reason"] == "InternalError"
    assert core.list_namespaced_secret(NS).items == []
    assert fault.hits == 2
    emu.inject(status=429, count=1)
    exc = api_error(lambda: core.read_namespace(NS))
    assert exc.status == 429
    assert status_of(exc)["reason"] == "TooManyRequests"
    # With Retry-After, urllib3 under the client waits and retries 413/429/503 by itself.
    emu.inject(status=503, retry_after=0, count=1)
    emu.clear_requests()
    assert core.read_namespace(NS).metadata.name == NS
    assert [r.status for r in emu.requests] == [503, 200]


def test_a_dropped_connection_surfaces_on_post_and_is_retried_on_get(
    core: client.CoreV1Api, emu: K8sEmulator
) -> None:
    emu.inject(method="POST", drop=True, count=1)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        core.create_namespaced_secret(NS, secret("a"))
    assert emu.get_object("secrets", NS, "a") is None
    emu.inject(method="GET", path_regex="/namespaces/team$", drop=True, count=1)
    emu.clear_requests()
    assert core.read_namespace(NS).metadata.name == NS  # urllib3 retried the idempotent GET
    assert [r.status for r in emu.requests] == [None, 200]


def test_an_injected_delay_slows_the_answer(core: client.CoreV1Api, emu: K8sEmulator) -> None:
    emu.inject(path_regex="/serviceaccounts/default", delay=0.3, count=1)
    started = time.monotonic()
    core.read_namespaced_service_account("default", NS)
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    core.read_namespaced_service_account("default", NS)
    assert time.monotonic() - started < 0.3


def test_the_request_log_shows_what_was_sent(core: client.CoreV1Api, emu: K8sEmulator) -> None:
    emu.clear_requests()
    core.patch_namespaced_service_account(
        "default", NS, [{"op": "add", "path": "/imagePullSecrets", "value": [{"name": "r"}]}]
    )
    core.list_namespaced_secret(NS, label_selector="a=b")
    patch, listing = emu.requests
    assert (patch.method, patch.path, patch.content_type, patch.status) == (
        "PATCH",
        f"/api/v1/namespaces/{NS}/serviceaccounts/default",
        JSON_PATCH,
        200,
    )
    assert patch.json()[0]["path"] == "/imagePullSecrets"
    assert listing.params == {"labelSelector": ["a=b"]}
    assert all(emu.token not in (r.path + r.query) for r in emu.requests)
    # what a test of the production code asserts: never a whole-list patch on an account
    assert not [
        r
        for r in emu.requests
        if r.method == "PATCH"
        and "/serviceaccounts/" in r.path
        and r.content_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH)
    ]


def test_put_object_bypasses_the_api(core: client.CoreV1Api, emu: K8sEmulator) -> None:
    stored = emu.put_object(
        "Secret", NS, {"metadata": {"name": "raw"}, "type": "anything", "data": {"k": "djE="}}
    )
    assert stored["kind"] == "Secret"
    assert stored["metadata"]["resourceVersion"] == emu.resource_version
    read = core.read_namespaced_secret("raw", NS)
    assert (read.type, read.data) == ("anything", {"k": "djE="})
    assert emu.delete_object("secrets", NS, "raw") is True
    assert emu.get_object("secrets", NS, "raw") is None
    with pytest.raises(ValueError, match="namespaced"):
        emu.get_object("secrets", None, "raw")


def test_concurrent_writers_are_serialised(core: client.CoreV1Api, emu: K8sEmulator) -> None:
    """Read-modify-PUT with retry on 409 from several threads loses no entry."""
    errors: list[BaseException] = []

    def add(entry: str) -> None:
        try:
            for _ in range(50):
                sa = core.read_namespaced_service_account("default", NS)
                sa.image_pull_secrets = [
                    *(sa.image_pull_secrets or []),
                    client.V1LocalObjectReference(name=entry),
                ]
                try:
                    core.replace_namespaced_service_account("default", NS, sa)
                    return
                except ApiException as exc:
                    if exc.status != 409:
                        raise
            raise AssertionError(f"{entry}: too many conflicts")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(f"reg-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    final = emu.get_object("serviceaccounts", NS, "default")
    assert final is not None
    assert sorted(ref["name"] for ref in final["imagePullSecrets"]) == [
        f"reg-{i}" for i in range(4)
    ]
