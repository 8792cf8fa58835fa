"""The Vault emulator against reference/vault.md, driven through hvac 2.4.0 and raw HTTP.

Every status code and body here is what real Vault answers (see the reference
and the Vault / KV plugin sources it cites). If the emulator drifts from Vault,
one of these fails. Secret values are obviously fake.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from tests.support.vault_emulator import VaultEmulator, go_duration, rfc3339_nano
from tests.support.vault_policy import ACL, PolicyError, parse_policy

pytestmark = pytest.mark.integration

ENVELOPE_KEYS = {
    "request_id",
    "lease_id",
    "renewable",
    "lease_duration",
    "data",
    "wrap_info",
    "warnings",
    "auth",
    "mount_type",
}
WRITE_DATA_KEYS = {"created_time", "custom_metadata", "deletion_time", "destroyed", "version"}
METADATA_KEYS = {
    "cas_required",
    "created_time",
    "current_version",
    "custom_metadata",
    "delete_version_after",
    "max_versions",
    "oldest_version",
    "updated_time",
    "versions",
}
LOGIN_AUTH_KEYS = {
    "client_token",
    "accessor",
    "policies",
    "token_policies",
    "metadata",
    "lease_duration",
    "renewable",
    "entity_id",
    "token_type",
    "orphan",
    "mfa_requirement",
    "num_uses",
}
RFC3339_NANO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")

DENIED = {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}
NO_TOKEN = {"errors": ["permission denied"]}
INVALID_TOKEN = {"errors": ["2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"]}
SEALED = {"errors": ["Vault is sealed"]}
NOT_FOUND: dict[str, list[str]] = {"errors": []}
CAS_MISMATCH = "check-and-set parameter did not match the current version"
CAS_REQUIRED = "check-and-set parameter required for this call"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def emu() -> Iterator[VaultEmulator]:
    emulator = VaultEmulator().start()
    try:
        yield emulator
    finally:
        emulator.stop()
    assert emulator.server_errors == []


class Http:
    """Raw HTTP to the emulator, for what hvac hides (headers, exact bodies, odd methods)."""

    def __init__(self, emu: VaultEmulator) -> None:
        self.emu = emu
        self.session = requests.Session()
        self.session.trust_env = False

    def __call__(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        namespace: str | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> requests.Response:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["X-Vault-Token"] = token
        if namespace is not None:
            all_headers["X-Vault-Namespace"] = namespace
        return self.session.request(
            method,
            self.emu.url + path,
            json=json,
            data=data,
            headers=all_headers,
            params=params,
            timeout=5,
        )

    def root(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self(method, path, token=self.emu.root_token, **kwargs)

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def http(emu: VaultEmulator) -> Iterator[Http]:
    client = Http(emu)
    try:
        yield client
    finally:
        client.close()


ClientFactory = Callable[..., hvac.Client]


@pytest.fixture
def make_client(emu: VaultEmulator) -> Iterator[ClientFactory]:
    made: list[hvac.Client] = []

    def make(token: str | None = None, namespace: str | None = None) -> hvac.Client:
        session = requests.Session()
        session.trust_env = False
        client = hvac.Client(
            url=emu.url, token=token, namespace=namespace, session=session, timeout=5
        )
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.adapter.close()


@pytest.fixture
def root(emu: VaultEmulator, make_client: ClientFactory) -> hvac.Client:
    return make_client(emu.root_token)


def kv(client: hvac.Client) -> Any:
    return client.secrets.kv.v2


def read(client: hvac.Client, path: str, **kwargs: Any) -> Any:
    return kv(client).read_secret_version(path, raise_on_deleted_version=False, **kwargs)


def _policy(emu: VaultEmulator, hcl: str) -> str:
    name = "p" + uuid.uuid4().hex[:8]
    emu.put_policy(name, hcl)
    return name


def token_with(emu: VaultEmulator, hcl: str, **kwargs: Any) -> str:
    return emu.create_token(policies=[_policy(emu, hcl)], **kwargs)


def rule(path: str, *caps: str) -> str:
    quoted = ", ".join(f'"{c}"' for c in caps)
    return f'path "{path}" {{\n  capabilities = [{quoted}]\n}}\n'


# --------------------------------------------------------------------------- envelope


def test_write_answers_the_exact_envelope(root: hvac.Client) -> None:
    response = kv(root).create_or_update_secret("reg/a", {"username": "u", "token": "fake-1"})
    assert set(response) == ENVELOPE_KEYS
    uuid.UUID(response["request_id"])
    assert response["lease_id"] == ""
    assert response["renewable"] is False
    assert response["lease_duration"] == 0
    assert response["wrap_info"] is None
    assert response["warnings"] is None
    assert response["auth"] is None
    assert response["mount_type"] == "kv"
    data = response["data"]
    assert set(data) == WRITE_DATA_KEYS
    assert data["custom_metadata"] is None
    assert data["deletion_time"] == ""
    assert data["destroyed"] is False
    assert data["version"] == 1
    assert RFC3339_NANO_UTC.match(data["created_time"])


def test_read_answers_data_and_metadata(root: hvac.Client) -> None:
    written = kv(root).create_or_update_secret("reg/a", {"username": "u"})["data"]
    response = read(root, "reg/a")
    assert set(response) == ENVELOPE_KEYS
    assert response["mount_type"] == "kv"
    assert response["data"]["data"] == {"username": "u"}
    assert response["data"]["metadata"] == written


def test_a_call_with_nothing_to_return_is_204_without_body(http: Http, root: hvac.Client) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "v"})
    response = http.root("DELETE", "/v1/secret/data/reg/a")
    assert response.status_code == 204
    assert response.content == b""
    assert "Content-Type" not in response.headers


def test_errors_have_exact_json_content_type_and_errors_list(http: Http) -> None:
    response = http.root("POST", "/v1/secret/data/reg/a", json={"options": {}})
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"errors": ["no data provided"]}


def test_not_found_is_404_with_empty_errors(http: Http, root: hvac.Client) -> None:
    response = http.root("GET", "/v1/secret/data/nope")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == NOT_FOUND
    with pytest.raises(hvac.exceptions.InvalidPath) as caught:
        read(root, "nope")
    assert caught.value.errors == []


# --------------------------------------------------------------------------- KV v2 write / read


def test_write_without_data_is_400_no_data_provided(root: hvac.Client) -> None:
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        root.adapter.post("/v1/secret/data/reg/a", json={"options": {"cas": 0}})
    assert caught.value.errors == ["no data provided"]


def test_write_to_a_path_ending_in_slash_is_refused(http: Http, emu: VaultEmulator) -> None:
    response = http.root("POST", "/v1/secret/data/reg/", json={"data": {"k": "v"}})
    assert response.status_code == 404
    assert response.json() == {"errors": ["1 error occurred:\n\t* unsupported path\n\n"]}
    assert emu.kv_keys() == []


def test_put_writes_like_post(http: Http) -> None:
    response = http.root("PUT", "/v1/secret/data/reg/a", json={"data": {"k": "v"}})
    assert response.status_code == 200
    assert response.json()["data"]["version"] == 1


def test_read_a_version_or_the_current_one(root: hvac.Client, http: Http) -> None:
    for value in ("one", "two", "three"):
        kv(root).create_or_update_secret("reg/a", {"v": value})
    assert read(root, "reg/a")["data"]["data"] == {"v": "three"}
    assert read(root, "reg/a", version=1)["data"]["data"] == {"v": "one"}
    assert read(root, "reg/a", version=2)["data"]["metadata"]["version"] == 2
    zero = http.root("GET", "/v1/secret/data/reg/a", params={"version": "0"})
    assert zero.json()["data"]["data"] == {"v": "three"}
    missing = http.root("GET", "/v1/secret/data/reg/a", params={"version": "9"})
    assert (missing.status_code, missing.json()) == (404, NOT_FOUND)


def test_soft_deleted_read_is_404_with_the_full_envelope(root: hvac.Client, http: Http) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "v"})
    kv(root).delete_latest_version_of_secret("reg/a")
    response = http.root("GET", "/v1/secret/data/reg/a")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert "errors" not in body
    assert body["data"]["data"] is None
    metadata = body["data"]["metadata"]
    assert set(metadata) == WRITE_DATA_KEYS
    assert metadata["version"] == 1
    assert metadata["destroyed"] is False
    assert RFC3339_NANO_UTC.match(metadata["deletion_time"])
    # hvac hands the body back when asked not to raise, and raises otherwise
    assert read(root, "reg/a")["data"]["data"] is None
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv(root).read_secret_version("reg/a", raise_on_deleted_version=True)


def test_destroyed_read_is_404_with_envelope_and_destroyed_flag(
    root: hvac.Client, http: Http
) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "v"})
    kv(root).destroy_secret_versions("reg/a", versions=[1])
    response = http.root("GET", "/v1/secret/data/reg/a")
    assert response.status_code == 404
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert body["data"]["data"] is None
    assert body["data"]["metadata"]["destroyed"] is True
    assert body["data"]["metadata"]["deletion_time"] == ""
    # deletion_time is "" so hvac raises even with raise_on_deleted_version=False
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(root, "reg/a")


def test_times_are_rfc3339_nanoseconds_utc() -> None:
    assert rfc3339_nano(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert rfc3339_nano(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"  # Go trims zeros
    assert rfc3339_nano(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    assert go_duration(0) == "0s"
    assert go_duration(3600 * 10**9) == "1h0m0s"
    assert go_duration(90 * 10**9) == "1m30s"


def test_timestamps_follow_the_emulator_clock(root: hvac.Client, emu: VaultEmulator) -> None:
    first = kv(root).create_or_update_secret("reg/a", {"k": "1"})["data"]["created_time"]
    emu.advance(3600)
    second = kv(root).create_or_update_secret("reg/a", {"k": "2"})["data"]["created_time"]
    assert RFC3339_NANO_UTC.match(first)
    assert RFC3339_NANO_UTC.match(second)
    gap = datetime.fromisoformat(second) - datetime.fromisoformat(first)
    assert 3600 <= gap.total_seconds() < 3660


# --------------------------------------------------------------------------- check-and-set


def test_cas_must_equal_the_current_version(root: hvac.Client) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "1"}, cas=0)
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        kv(root).create_or_update_secret("reg/a", {"k": "2"}, cas=0)
    assert caught.value.errors == [CAS_MISMATCH]
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        kv(root).create_or_update_secret("reg/a", {"k": "2"}, cas=2)
    assert caught.value.errors == [CAS_MISMATCH]
    assert kv(root).create_or_update_secret("reg/a", {"k": "2"}, cas=1)["data"]["version"] == 2


def test_cas_mismatch_body_is_exact(http: Http) -> None:
    http.root("POST", "/v1/secret/data/reg/a", json={"data": {"k": "1"}})
    response = http.root(
        "POST", "/v1/secret/data/reg/a", json={"options": {"cas": 5}, "data": {"k": "2"}}
    )
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"errors": [CAS_MISMATCH]}


def test_cas_zero_only_while_the_key_has_no_metadata(root: hvac.Client) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "1"})
    kv(root).delete_latest_version_of_secret("reg/a")
    # a soft-deleted key still has a current version
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        kv(root).create_or_update_secret("reg/a", {"k": "2"}, cas=0)
    assert caught.value.errors == [CAS_MISMATCH]
    kv(root).delete_metadata_and_all_versions("reg/a")
    assert kv(root).create_or_update_secret("reg/a", {"k": "3"}, cas=0)["data"]["version"] == 1


def test_top_level_cas_is_ignored_with_a_warning(http: Http) -> None:
    http.root("POST", "/v1/secret/data/reg/a", json={"data": {"k": "1"}})
    response = http.root("POST", "/v1/secret/data/reg/a", json={"cas": 0, "data": {"k": "2"}})
    assert response.status_code == 200
    body = response.json()
    assert body["data"]["version"] == 2
    assert body["warnings"] == ["Endpoint ignored these unrecognized parameters: [cas]"]


def test_cas_required_on_the_key(root: hvac.Client) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "1"})
    kv(root).update_metadata("reg/a", cas_required=True)
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        kv(root).create_or_update_secret("reg/a", {"k": "2"})
    assert caught.value.errors == [CAS_REQUIRED]
    assert kv(root).create_or_update_secret("reg/a", {"k": "2"}, cas=1)["data"]["version"] == 2


def test_cas_required_on_the_mount(root: hvac.Client, emu: VaultEmulator) -> None:
    kv(root).configure(max_versions=0, cas_required=True)
    assert kv(root).read_configuration()["data"] == {
        "cas_required": True,
        "delete_version_after": "0s",
        "max_versions": 0,
    }
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        kv(root).create_or_update_secret("reg/a", {"k": "1"})
    assert caught.value.errors == [CAS_REQUIRED]
    emu.enable_kv2("strict", cas_required=True)
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        kv(root).create_or_update_secret("x", {"k": "1"}, mount_point="strict")
    assert caught.value.errors == [CAS_REQUIRED]
    assert kv(root).create_or_update_secret("x", {"k": "1"}, cas=0, mount_point="strict")


# --------------------------------------------------------------------------- versions kept


def test_ten_versions_are_kept_by_default(root: hvac.Client) -> None:
    for i in range(12):
        kv(root).create_or_update_secret("reg/a", {"i": str(i)})
    metadata = kv(root).read_secret_metadata("reg/a")["data"]
    assert metadata["current_version"] == 12
    assert metadata["oldest_version"] == 3
    assert sorted(metadata["versions"], key=int) == [str(v) for v in range(3, 13)]
    with pytest.raises(hvac.exceptions.InvalidPath) as caught:
        read(root, "reg/a", version=2)
    assert caught.value.json == NOT_FOUND
    assert read(root, "reg/a", version=3)["data"]["data"] == {"i": "2"}


def test_versions_kept_is_the_larger_of_key_and_mount_settings(
    root: hvac.Client, emu: VaultEmulator
) -> None:
    kv(root).update_metadata("solo", max_versions=2)
    for i in range(4):
        kv(root).create_or_update_secret("solo", {"i": str(i)})
    assert sorted(kv(root).read_secret_metadata("solo")["data"]["versions"]) == ["3", "4"]

    emu.enable_kv2("wide", max_versions=3)
    kv(root).update_metadata("both", max_versions=2, mount_point="wide")
    for i in range(5):
        kv(root).create_or_update_secret("both", {"i": str(i)}, mount_point="wide")
    metadata = kv(root).read_secret_metadata("both", mount_point="wide")["data"]
    assert sorted(metadata["versions"]) == ["3", "4", "5"]
    assert metadata["oldest_version"] == 3


# --------------------------------------------------------------------------- patch


def test_patch_is_a_json_merge_patch(http: Http) -> None:
    http.root(
        "POST",
        "/v1/secret/data/reg/a",
        json={"data": {"user": "u", "token": "fake", "nested": {"a": 1, "b": 2}}},
    )
    response = http.root(
        "PATCH",
        "/v1/secret/data/reg/a",
        json={"data": {"token": None, "extra": "x", "nested": {"b": None, "c": 3}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert set(body["data"]) == WRITE_DATA_KEYS
    assert body["data"]["version"] == 2
    current = http.root("GET", "/v1/secret/data/reg/a").json()["data"]["data"]
    assert current == {"user": "u", "extra": "x", "nested": {"a": 1, "c": 3}}


def test_patch_with_another_content_type_is_415(http: Http) -> None:
    http.root("POST", "/v1/secret/data/reg/a", json={"data": {"k": "v"}})
    response = http.root("PATCH", "/v1/secret/data/reg/a", json={"data": {"k": "w"}})
    assert response.status_code == 415
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {
        "errors": [
            "PATCH requires Content-Type of application/merge-patch+json, provided application/json"
        ]
    }


def test_patch_of_a_missing_key_is_404(http: Http) -> None:
    response = http.root(
        "PATCH",
        "/v1/secret/data/reg/none",
        json={"data": {"k": "v"}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"


def test_patch_honours_cas(http: Http) -> None:
    http.root("POST", "/v1/secret/data/reg/a", json={"data": {"k": "v"}})
    response = http.root(
        "PATCH",
        "/v1/secret/data/reg/a",
        json={"options": {"cas": 7}, "data": {"k": "w"}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert (response.status_code, response.json()) == (400, {"errors": [CAS_MISMATCH]})


def test_hvac_patch_is_a_read_then_a_cas_write(root: hvac.Client, emu: VaultEmulator) -> None:
    kv(root).create_or_update_secret("reg/a", {"a": "1", "b": "2"})
    emu.clear_requests()
    # hvac's patch() reads without raise_on_deleted_version, so it always warns
    with pytest.warns(DeprecationWarning, match="raise_on_deleted_version"):
        response = kv(root).patch("reg/a", {"b": "3"})
    assert response["data"]["version"] == 2
    assert [(r.method, r.path) for r in emu.requests] == [
        ("GET", "/v1/secret/data/reg/a"),
        ("POST", "/v1/secret/data/reg/a"),
    ]
    assert read(root, "reg/a")["data"]["data"] == {"a": "1", "b": "3"}


# --------------------------------------------------------------------------- delete & destroy


def test_delete_latest_is_204_even_when_absent(http: Http, root: hvac.Client) -> None:
    assert http.root("DELETE", "/v1/secret/data/never").status_code == 204
    kv(root).create_or_update_secret("reg/a", {"k": "1"})
    kv(root).create_or_update_secret("reg/a", {"k": "2"})
    assert http.root("DELETE", "/v1/secret/data/reg/a").status_code == 204
    assert http.root("DELETE", "/v1/secret/data/reg/a").status_code == 204
    assert read(root, "reg/a")["data"]["data"] is None
    assert read(root, "reg/a", version=1)["data"]["data"] == {"k": "1"}


def test_delete_and_undelete_versions(root: hvac.Client, http: Http) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "1"})
    kv(root).create_or_update_secret("reg/a", {"k": "2"})
    response = http.root("POST", "/v1/secret/delete/reg/a", json={"versions": [1, 2]})
    assert (response.status_code, response.content) == (204, b"")
    assert read(root, "reg/a", version=1)["data"]["data"] is None
    assert read(root, "reg/a", version=2)["data"]["data"] is None
    response = http.root("POST", "/v1/secret/undelete/reg/a", json={"versions": [2]})
    assert (response.status_code, response.content) == (204, b"")
    assert read(root, "reg/a")["data"]["data"] == {"k": "2"}
    assert read(root, "reg/a", version=1)["data"]["data"] is None
    versions = kv(root).read_secret_metadata("reg/a")["data"]["versions"]
    assert versions["2"]["deletion_time"] == ""
    assert RFC3339_NANO_UTC.match(versions["1"]["deletion_time"])


def test_empty_version_lists_are_400(http: Http) -> None:
    http.root("POST", "/v1/secret/data/reg/a", json={"data": {"k": "v"}})
    for action, message in (
        ("delete", "No version number provided"),
        ("undelete", "No version number provided"),
        ("destroy", "no version number provided"),
    ):
        response = http.root("POST", f"/v1/secret/{action}/reg/a", json={"versions": []})
        assert response.status_code == 400, action
        assert response.json() == {"errors": [message]}


def test_hvac_refuses_empty_version_lists_before_sending(
    root: hvac.Client, emu: VaultEmulator
) -> None:
    emu.clear_requests()
    with pytest.raises(hvac.exceptions.ParamValidationError):
        kv(root).delete_secret_versions("reg/a", versions=[])
    assert emu.requests == []


def test_destroy_is_permanent(root: hvac.Client) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "1"})
    kv(root).create_or_update_secret("reg/a", {"k": "2"})
    kv(root).destroy_secret_versions("reg/a", versions=[1])
    kv(root).undelete_secret_versions("reg/a", versions=[1])
    versions = kv(root).read_secret_metadata("reg/a")["data"]["versions"]
    assert versions["1"]["destroyed"] is True
    assert versions["2"]["destroyed"] is False
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(root, "reg/a", version=1)
    assert read(root, "reg/a")["data"]["data"] == {"k": "2"}


# --------------------------------------------------------------------------- list


def test_list_with_method_list_and_get_list_true(root: hvac.Client, http: Http) -> None:
    for path in ("reg/b", "reg/a", "reg/dir/x", "other"):
        kv(root).create_or_update_secret(path, {"k": "v"})
    assert kv(root).list_secrets("reg")["data"] == {"keys": ["a", "b", "dir/"]}
    assert kv(root).list_secrets("")["data"] == {"keys": ["other", "reg/"]}
    by_get = http.root("GET", "/v1/secret/metadata/reg", params={"list": "true"})
    assert by_get.status_code == 200
    assert set(by_get.json()) == ENVELOPE_KEYS
    assert by_get.json()["data"] == {"keys": ["a", "b", "dir/"]}
    by_list = http.root("LIST", "/v1/secret/metadata/reg/")
    assert by_list.json()["data"] == {"keys": ["a", "b", "dir/"]}


def test_list_of_nothing_is_404(root: hvac.Client, http: Http) -> None:
    response = http.root("LIST", "/v1/secret/metadata/reg")
    assert (response.status_code, response.json()) == (404, NOT_FOUND)
    kv(root).create_or_update_secret("reg/a", {"k": "v"})
    response = http.root("LIST", "/v1/secret/metadata/reg/a")  # a key, not a folder
    assert (response.status_code, response.json()) == (404, NOT_FOUND)
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv(root).list_secrets("empty")


def test_list_keeps_soft_deleted_keys_but_not_metadata_deleted_ones(root: hvac.Client) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "v"})
    kv(root).create_or_update_secret("reg/b", {"k": "v"})
    kv(root).delete_latest_version_of_secret("reg/a")
    kv(root).delete_metadata_and_all_versions("reg/b")
    assert kv(root).list_secrets("reg")["data"]["keys"] == ["a"]


# --------------------------------------------------------------------------- metadata


def test_metadata_read_fields(root: hvac.Client) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "1"})
    kv(root).create_or_update_secret("reg/a", {"k": "2"})
    response = kv(root).read_secret_metadata("reg/a")
    assert set(response) == ENVELOPE_KEYS
    data = response["data"]
    assert set(data) >= METADATA_KEYS
    assert data["cas_required"] is False
    assert data["current_version"] == 2
    assert data["custom_metadata"] is None
    assert data["delete_version_after"] == "0s"
    assert data["max_versions"] == 0
    assert data["oldest_version"] == 0
    assert data["created_time"] == data["versions"]["1"]["created_time"]
    assert data["updated_time"] == data["versions"]["2"]["created_time"]
    assert set(data["versions"]) == {"1", "2"}
    assert set(data["versions"]["1"]) == {"created_time", "deletion_time", "destroyed"}


def test_metadata_read_of_a_missing_key_is_404(http: Http) -> None:
    response = http.root("GET", "/v1/secret/metadata/missing")
    assert (response.status_code, response.json()) == (404, NOT_FOUND)


def test_metadata_write_is_204_and_replaces_custom_metadata(http: Http, root: hvac.Client) -> None:
    kv(root).create_or_update_secret("reg/a", {"k": "v"})
    response = http.root(
        "POST",
        "/v1/secret/metadata/reg/a",
        json={"max_versions": 5, "cas_required": True, "custom_metadata": {"a": "1", "b": "2"}},
    )
    assert (response.status_code, response.content) == (204, b"")
    kv(root).update_metadata("reg/a", custom_metadata={"c": "3"})
    data = kv(root).read_secret_metadata("reg/a")["data"]
    assert data["custom_metadata"] == {"c": "3"}
    assert data["max_versions"] == 5
    assert data["cas_required"] is True
    kv(root).update_metadata("reg/a", max_versions=6)  # no custom_metadata: kept
    assert kv(root).read_secret_metadata("reg/a")["data"]["custom_metadata"] == {"c": "3"}
    # custom_metadata shows up in data reads and writes
    assert read(root, "reg/a")["data"]["metadata"]["custom_metadata"] == {"c": "3"}


def test_metadata_write_creates_a_key_without_versions(root: hvac.Client) -> None:
    kv(root).update_metadata("fresh", max_versions=3)
    data = kv(root).read_secret_metadata("fresh")["data"]
    assert data["current_version"] == 0
    assert data["versions"] == {}
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(root, "fresh")


def test_metadata_delete_removes_every_version(http: Http, root: hvac.Client) -> None:
    assert http.root("DELETE", "/v1/secret/metadata/never").status_code == 204
    kv(root).create_or_update_secret("reg/a", {"k": "1"})
    kv(root).create_or_update_secret("reg/a", {"k": "2"})
    response = http.root("DELETE", "/v1/secret/metadata/reg/a")
    assert (response.status_code, response.content) == (204, b"")
    for version in (1, 2):
        with pytest.raises(hvac.exceptions.InvalidPath) as caught:
            read(root, "reg/a", version=version)
        assert caught.value.json == NOT_FOUND


def test_delete_version_after_soft_deletes_on_the_clock(
    root: hvac.Client, emu: VaultEmulator
) -> None:
    kv(root).update_metadata("reg/a", delete_version_after="1h")
    assert kv(root).read_secret_metadata("reg/a")["data"]["delete_version_after"] == "1h0m0s"
    written = kv(root).create_or_update_secret("reg/a", {"k": "v"})["data"]
    assert written["deletion_time"] != ""
    assert read(root, "reg/a")["data"]["data"] == {"k": "v"}
    emu.advance(3601)
    assert read(root, "reg/a")["data"]["data"] is None


# --------------------------------------------------------------------------- tokens


def test_token_in_x_vault_token_or_bearer(http: Http, emu: VaultEmulator) -> None:
    token = emu.create_token(ttl=60)
    by_header = http("GET", "/v1/auth/token/lookup-self", token=token)
    by_bearer = http(
        "GET",
        "/v1/auth/token/lookup-self",
        token=None,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert by_header.status_code == by_bearer.status_code == 200
    assert by_header.json()["data"]["accessor"] == by_bearer.json()["data"]["accessor"]


def test_lookup_self(make_client: ClientFactory, emu: VaultEmulator) -> None:
    emu.put_policy("reader", rule("secret/data/*", "read"))
    client = make_client(emu.create_token(policies=["reader"], ttl=60))
    response = client.auth.token.lookup_self()
    assert set(response) == ENVELOPE_KEYS
    data = response["data"]
    assert data["policies"] == ["default", "reader"]
    assert 58 <= data["ttl"] <= 60
    assert data["renewable"] is True
    assert data["type"] == "service"
    assert RFC3339_NANO_UTC.match(data["expire_time"])
    assert client.is_authenticated()


def test_renew_self_with_increment(make_client: ClientFactory, emu: VaultEmulator) -> None:
    client = make_client(emu.create_token(ttl=60))
    response = client.auth.token.renew_self(increment="1h")
    assert set(response) == ENVELOPE_KEYS
    auth = response["auth"]
    assert {"client_token", "policies", "lease_duration", "renewable"} <= set(auth)
    assert auth["client_token"] == client.token
    assert auth["policies"] == ["default"]
    assert auth["renewable"] is True
    assert 3598 <= auth["lease_duration"] <= 3600
    assert 3598 <= client.auth.token.lookup_self()["data"]["ttl"] <= 3600


def test_renew_self_is_capped_by_max_ttl(make_client: ClientFactory, emu: VaultEmulator) -> None:
    client = make_client(emu.create_token(ttl=60, max_ttl=600))
    response = client.auth.token.renew_self(increment=3600)
    assert 598 <= response["auth"]["lease_duration"] <= 600
    assert "capped" in response["warnings"][0]
    emu.advance(601)
    assert not client.is_authenticated()


def test_renew_of_a_non_renewable_token_is_400(
    make_client: ClientFactory, emu: VaultEmulator
) -> None:
    client = make_client(emu.create_token(ttl=60, renewable=False))
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        client.auth.token.renew_self()
    assert caught.value.errors == ["lease is not renewable"]


def test_expired_token_is_403_invalid_token(http: Http, emu: VaultEmulator) -> None:
    token = emu.create_token(ttl=60)
    assert http("GET", "/v1/auth/token/lookup-self", token=token).status_code == 200
    emu.advance(61)
    response = http("GET", "/v1/auth/token/lookup-self", token=token)
    assert (response.status_code, response.json()) == (403, INVALID_TOKEN)
    other = emu.create_token(ttl=60)
    emu.expire(other)
    response = http("GET", "/v1/secret/data/x", token=other)
    assert (response.status_code, response.json()) == (403, INVALID_TOKEN)


def test_revoked_token_is_403_invalid_token(
    http: Http, emu: VaultEmulator, make_client: ClientFactory
) -> None:
    token = emu.create_token(ttl=60)
    client = make_client(token)
    assert client.is_authenticated()
    emu.revoke(token)
    response = http("GET", "/v1/auth/token/lookup-self", token=token)
    assert (response.status_code, response.json()) == (403, INVALID_TOKEN)
    assert not client.is_authenticated()
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        read(client, "x")
    assert caught.value.errors == INVALID_TOKEN["errors"]


def test_revoke_self(make_client: ClientFactory, emu: VaultEmulator) -> None:
    client = make_client(emu.create_token(ttl=60))
    response = client.auth.token.revoke_self()
    assert response.status_code == 204
    assert not client.is_authenticated()


def test_unknown_token_is_403_invalid_token(http: Http) -> None:
    response = http("GET", "/v1/secret/data/x", token="hvs.not-a-real-token")
    assert (response.status_code, response.json()) == (403, INVALID_TOKEN)


def test_no_token_is_403_permission_denied(http: Http) -> None:
    response = http("GET", "/v1/secret/data/x", token=None)
    assert response.status_code == 403
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == NO_TOKEN


def test_policy_denial_is_403_with_the_multierror_body(
    http: Http, emu: VaultEmulator, make_client: ClientFactory
) -> None:
    token = token_with(emu, rule("secret/data/allowed/*", "read"))
    response = http("GET", "/v1/secret/data/other/x", token=token)
    assert (response.status_code, response.json()) == (403, DENIED)
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        read(make_client(token), "other/x")
    assert caught.value.errors == DENIED["errors"]


def test_token_create_over_http(root: hvac.Client, make_client: ClientFactory) -> None:
    response = root.auth.token.create(policies=["reader"], ttl="10m")
    auth = response["auth"]
    assert auth["policies"] == ["default", "reader"]
    assert 598 <= auth["lease_duration"] <= 600
    child = make_client(auth["client_token"])
    assert child.auth.token.lookup_self()["data"]["policies"] == ["default", "reader"]


def test_root_token_lookup(root: hvac.Client, emu: VaultEmulator) -> None:
    data = root.auth.token.lookup_self()["data"]
    assert data["policies"] == ["root"]
    assert data["ttl"] == 0
    assert data["expire_time"] is None
    assert data["id"] == emu.root_token


# --------------------------------------------------------------------------- AppRole


def test_approle_login(make_client: ClientFactory, emu: VaultEmulator) -> None:
    emu.put_policy("reader", rule("secret/data/reg/*", "read"))
    emu.kv_put("reg/a", {"k": "v"})
    role_id, secret_id = emu.add_approle("credbroker", policies=["reader"], token_ttl=1200)
    client = make_client()
    response = client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    assert set(response) == ENVELOPE_KEYS
    assert response["data"] is None
    auth = response["auth"]
    assert set(auth) == LOGIN_AUTH_KEYS
    assert auth["policies"] == auth["token_policies"] == ["default", "reader"]
    assert auth["metadata"] == {"role_name": "credbroker"}
    assert auth["lease_duration"] == 1200
    assert auth["renewable"] is True
    assert auth["token_type"] == "service"
    assert auth["orphan"] is True
    assert auth["mfa_requirement"] is None
    assert client.token == auth["client_token"]
    assert read(client, "reg/a")["data"]["data"] == {"k": "v"}
    with pytest.raises(hvac.exceptions.Forbidden):
        kv(client).create_or_update_secret("reg/a", {"k": "w"})


def test_approle_login_with_a_wrong_pair_is_400(
    make_client: ClientFactory, emu: VaultEmulator, http: Http
) -> None:
    role_id, secret_id = emu.add_approle("credbroker")
    client = make_client()
    for pair in ((role_id, "wrong"), ("wrong", secret_id)):
        with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
            client.auth.approle.login(role_id=pair[0], secret_id=pair[1])
        assert caught.value.errors == ["invalid role or secret ID"]
    response = http(
        "POST", "/v1/auth/approle/login", token=None, json={"role_id": role_id, "secret_id": "x"}
    )
    assert (response.status_code, response.json()) == (
        400,
        {"errors": ["invalid role or secret ID"]},
    )
    assert client.token is None


def test_approle_secret_id_uses_and_rotation(
    make_client: ClientFactory, emu: VaultEmulator
) -> None:
    role_id, secret_id = emu.add_approle("once", secret_id_num_uses=1)
    client = make_client()
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    fresh = emu.new_secret_id("once")
    assert client.auth.approle.login(role_id=role_id, secret_id=fresh)["auth"]["client_token"]


def test_approle_token_max_ttl_limits_renewal(
    make_client: ClientFactory, emu: VaultEmulator
) -> None:
    role_id, secret_id = emu.add_approle("short", token_ttl=60, token_max_ttl=120)
    client = make_client()
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    assert client.auth.token.renew_self(increment="1h")["auth"]["lease_duration"] <= 120
    emu.advance(121)
    assert not client.is_authenticated()


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_login(make_client: ClientFactory, emu: VaultEmulator) -> None:
    emu.add_kubernetes_role(
        "credbroker",
        service_account="credbroker",
        namespace="registry",
        policies=["reader"],
        token_ttl=900,
    )
    client = make_client()
    response = client.auth.kubernetes.login(
        "credbroker", emu.kubernetes_jwt("credbroker", "registry")
    )
    auth = response["auth"]
    assert set(auth) == LOGIN_AUTH_KEYS
    assert auth["metadata"]["service_account_name"] == "credbroker"
    assert auth["metadata"]["service_account_namespace"] == "registry"
    assert auth["metadata"]["role"] == "credbroker"
    assert auth["policies"] == ["default", "reader"]
    assert auth["lease_duration"] == 900
    assert client.is_authenticated()


def test_kubernetes_login_refusals(make_client: ClientFactory, emu: VaultEmulator) -> None:
    emu.add_kubernetes_role("credbroker", service_account="credbroker", namespace="registry")
    client = make_client()
    cases: list[tuple[str, str, type[hvac.exceptions.VaultError], str]] = [
        ("nope", emu.kubernetes_jwt("credbroker", "registry"), hvac.exceptions.InvalidRequest,
         'invalid role name "nope"'),
        ("credbroker", emu.kubernetes_jwt("intruder", "registry"), hvac.exceptions.Forbidden,
         "service account name not authorized"),
        ("credbroker", emu.kubernetes_jwt("credbroker", "elsewhere"), hvac.exceptions.Forbidden,
         "namespace not authorized"),
        ("credbroker", emu.kubernetes_jwt("credbroker", "registry")[:-4] + "AAAA",
         hvac.exceptions.Forbidden, "permission denied"),
        ("credbroker", "not-a-jwt", hvac.exceptions.Forbidden, "permission denied"),
    ]  # fmt: skip
    for role, jwt, error, message in cases:
        with pytest.raises(error) as caught:
            client.auth.kubernetes.login(role, jwt)
        assert caught.value.errors == [message], role
    expiring = emu.kubernetes_jwt("credbroker", "registry", ttl=60)
    emu.advance(61)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.kubernetes.login("credbroker", expiring)
    assert client.token is None


def test_kubernetes_role_globs(make_client: ClientFactory, emu: VaultEmulator) -> None:
    emu.add_kubernetes_role("any", service_account="*", namespace=["team-*", "ops"])
    client = make_client()
    assert client.auth.kubernetes.login("any", emu.kubernetes_jwt("x", "team-a"))
    assert client.auth.kubernetes.login("any", emu.kubernetes_jwt("y", "ops"))
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.kubernetes.login("any", emu.kubernetes_jwt("x", "dev"))


# --------------------------------------------------------------------------- ACL


def test_policy_parser_reads_comments_and_refuses_bad_capabilities() -> None:
    policy = parse_policy(
        "p",
        """
        # hash comment
        // slash comment
        /* block
           comment */
        path "secret/data/reg/*" { capabilities = ["read", "list",] }
        path "/secret/metadata/reg" {
          capabilities = ["list"]  # trailing comment
        }
        path "legacy/*" { policy = "write" }
        """,
    )
    acl = ACL([policy])
    assert acl.allows("secret/data/reg/a", "read")
    assert acl.allows("secret/metadata/reg/", "list")
    assert acl.allows("legacy/x", "update")
    assert not acl.allows("legacy/x", "sudo")
    with pytest.raises(PolicyError, match='invalid capability "write"'):
        parse_policy("bad", 'path "x" { capabilities = ["write"] }')
    with pytest.raises(PolicyError):
        parse_policy("bad", 'path "x" { capabilities = ["read"]')
    with pytest.raises(PolicyError):
        parse_policy("bad", 'path "x" { frobnicate = true }')


def test_star_is_a_prefix_only_at_the_end(http: Http, emu: VaultEmulator) -> None:
    emu.kv_put("reg", {"k": "v"})
    emu.kv_put("reg/a", {"k": "v"})
    emu.kv_put("reg/a/b", {"k": "v"})
    emu.kv_put("region", {"k": "v"})
    emu.kv_put("x/mid/y", {"k": "v"})
    token = token_with(emu, rule("secret/data/reg/*", "read") + rule("secret/data/*/mid/y", "read"))
    assert http("GET", "/v1/secret/data/reg/a", token=token).status_code == 200
    assert http("GET", "/v1/secret/data/reg/a/b", token=token).status_code == 200
    assert http("GET", "/v1/secret/data/reg", token=token).status_code == 403
    assert http("GET", "/v1/secret/data/region", token=token).status_code == 403
    # "*" in the middle is a literal character, not a wildcard (also next to "+")
    assert http("GET", "/v1/secret/data/x/mid/y", token=token).status_code == 403
    mixed = token_with(emu, rule("secret/data/+/*/y", "read"))
    emu.kv_put("a/mid/y", {"k": "v"})
    assert http("GET", "/v1/secret/data/a/mid/y", token=mixed).status_code == 403
    # the prefix is a string prefix, not a whole segment
    chars = token_with(emu, rule("secret/data/re*", "read"))
    assert http("GET", "/v1/secret/data/region", token=chars).status_code == 200
    assert http("GET", "/v1/secret/data/reg/a/b", token=chars).status_code == 200
    assert http("GET", "/v1/secret/data/x/mid/y", token=chars).status_code == 403


def test_plus_is_exactly_one_segment(http: Http, emu: VaultEmulator) -> None:
    for path in ("a/cfg", "a/b/cfg", "cfg", "a/cfg2"):
        emu.kv_put(path, {"k": "v"})
    token = token_with(emu, rule("secret/data/+/cfg", "read"))
    assert http("GET", "/v1/secret/data/a/cfg", token=token).status_code == 200
    assert http("GET", "/v1/secret/data/a/b/cfg", token=token).status_code == 403
    assert http("GET", "/v1/secret/data/cfg", token=token).status_code == 403
    assert http("GET", "/v1/secret/data/a/cfg2", token=token).status_code == 403
    both = token_with(emu, rule("secret/data/+/cfg*", "read"))
    assert http("GET", "/v1/secret/data/a/cfg2", token=both).status_code == 200


def test_deny_wins(http: Http, emu: VaultEmulator) -> None:
    emu.kv_put("reg/a", {"k": "v"})
    emu.put_policy("reader", rule("secret/data/reg/*", "read", "list"))
    emu.put_policy("blocker", rule("secret/data/reg/*", "deny"))
    emu.put_policy("sudoer", rule("secret/data/reg/*", "read", "sudo", "deny"))
    blocked = emu.create_token(policies=["reader", "blocker"])
    assert http("GET", "/v1/secret/data/reg/a", token=blocked).json() == DENIED
    alone = emu.create_token(policies=["sudoer"])
    assert http("GET", "/v1/secret/data/reg/a", token=alone).status_code == 403
    reader = emu.create_token(policies=["reader"])
    assert http("GET", "/v1/secret/data/reg/a", token=reader).status_code == 200


def test_the_most_specific_rule_wins(http: Http, emu: VaultEmulator) -> None:
    emu.kv_put("reg/open", {"k": "v"})
    emu.kv_put("reg/closed", {"k": "v"})
    token = token_with(
        emu,
        rule("secret/data/reg/*", "deny")
        + rule("secret/data/reg/open", "read")
        + rule("secret/data/+/closed", "read"),
    )
    assert http("GET", "/v1/secret/data/reg/open", token=token).status_code == 200
    # the glob matches later than "+" does, so it has priority
    assert http("GET", "/v1/secret/data/reg/closed", token=token).status_code == 403


def test_write_needs_create_for_a_new_key_and_update_for_an_existing_one(
    http: Http, emu: VaultEmulator
) -> None:
    creator = token_with(emu, rule("secret/data/*", "create"))
    updater = token_with(emu, rule("secret/data/*", "update"))
    body = {"data": {"k": "v"}}
    assert http("POST", "/v1/secret/data/new", token=updater, json=body).json() == DENIED
    assert http("POST", "/v1/secret/data/new", token=creator, json=body).status_code == 200
    assert http("POST", "/v1/secret/data/new", token=creator, json=body).json() == DENIED
    assert http("POST", "/v1/secret/data/new", token=updater, json=body).status_code == 200
    # a soft-deleted key still exists: update, not create
    http.root("DELETE", "/v1/secret/data/new")
    assert http("PUT", "/v1/secret/data/new", token=creator, json=body).status_code == 403


def test_kv_v2_paths_need_their_capability(http: Http, emu: VaultEmulator) -> None:
    emu.kv_put("reg/a", {"k": "v"})
    emu.kv_put("reg/a", {"k": "w"})
    merge = {"Content-Type": "application/merge-patch+json"}
    checks: list[tuple[str, str, str, dict[str, Any] | None, dict[str, str] | None]] = [
        ("GET", "/v1/secret/data/reg/a", "secret/data/reg/*:read", None, None),
        ("PATCH", "/v1/secret/data/reg/a", "secret/data/reg/*:patch", {"data": {"x": "1"}}, merge),
        ("DELETE", "/v1/secret/data/reg/a", "secret/data/reg/*:delete", None, None),
        ("LIST", "/v1/secret/metadata/reg", "secret/metadata/reg/*:list", None, None),
        ("GET", "/v1/secret/metadata/reg/a", "secret/metadata/reg/*:read", None, None),
        ("DELETE", "/v1/secret/metadata/reg/a", "secret/metadata/reg/*:delete", None, None),
        ("POST", "/v1/secret/delete/reg/a", "secret/delete/reg/*:update", {"versions": [1]}, None),
        (
            "POST",
            "/v1/secret/undelete/reg/a",
            "secret/undelete/reg/*:update",
            {"versions": [1]},
            None,
        ),
        (
            "POST",
            "/v1/secret/destroy/reg/a",
            "secret/destroy/reg/*:update",
            {"versions": [1]},
            None,
        ),
    ]
    everything_else = ["create", "read", "update", "patch", "delete", "list", "sudo"]
    for method, path, grant, body, headers in checks:
        acl_path, capability = grant.split(":")
        others = [c for c in everything_else if c != capability]
        without = token_with(emu, rule(acl_path, *others))
        denied = http(method, path, token=without, json=body, headers=headers)
        assert (denied.status_code, denied.json()) == (403, DENIED), (method, path)
        with_it = token_with(emu, rule(acl_path, capability))
        allowed = http(method, path, token=with_it, json=body, headers=headers)
        assert allowed.status_code in (200, 204), (method, path, allowed.text)


def test_read_only_consumer_policy_from_the_reference(
    make_client: ClientFactory, emu: VaultEmulator
) -> None:
    emu.enable_kv2("creds")
    emu.kv_put("reg/a", {"k": "v"}, mount="creds")
    emu.kv_put("reg/b", {"k": "v"}, mount="creds")
    emu.kv_put("elsewhere", {"k": "v"}, mount="creds")
    token = token_with(
        emu,
        'path "creds/data/reg/*" {capabilities=["read"]}\n'
        'path "creds/metadata/reg/*" {capabilities=["list","read"]}\n',
    )
    client = make_client(token)
    assert kv(client).list_secrets("reg", mount_point="creds")["data"]["keys"] == ["a", "b"]
    assert read(client, "reg/a", mount_point="creds")["data"]["data"] == {"k": "v"}
    assert kv(client).read_secret_metadata("reg/a", mount_point="creds")["data"]
    with pytest.raises(hvac.exceptions.Forbidden):
        kv(client).create_or_update_secret("reg/a", {"k": "w"}, mount_point="creds")
    with pytest.raises(hvac.exceptions.Forbidden):
        kv(client).list_secrets("", mount_point="creds")
    with pytest.raises(hvac.exceptions.Forbidden):
        read(client, "elsewhere", mount_point="creds")


def test_policies_over_http_and_capabilities_self(
    root: hvac.Client, make_client: ClientFactory
) -> None:
    root.sys.create_or_update_acl_policy("viewer", rule("secret/data/reg/*", "read", "list"))
    assert "viewer" in root.sys.list_acl_policies()["data"]["keys"]
    assert root.sys.read_acl_policy("viewer")["data"]["policy"].startswith('path "secret')
    with pytest.raises(hvac.exceptions.InvalidRequest):
        root.sys.create_or_update_acl_policy("broken", 'path "x" {')
    client = make_client(root.auth.token.create(policies=["viewer"])["auth"]["client_token"])
    caps = client.sys.get_capabilities(paths=["secret/data/reg/a", "secret/data/other"])["data"]
    assert caps["secret/data/reg/a"] == ["list", "read"]
    assert caps["secret/data/other"] == ["deny"]


def test_unknown_mounts(http: Http, emu: VaultEmulator) -> None:
    response = http.root("GET", "/v1/nomount/data/x/y")
    assert response.status_code == 404
    assert response.json() == {
        "errors": ['no handler for route "nomount/data/x/y". route entry not found.']
    }
    token = emu.create_token()
    assert http("GET", "/v1/nomount/data/x/y", token=token).json() == DENIED


# --------------------------------------------------------------------------- health & seal


def test_health_without_token(http: Http, emu: VaultEmulator, root: hvac.Client) -> None:
    response = http("GET", "/v1/sys/health", token=None)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["initialized"] is True
    assert body["sealed"] is False
    assert body["standby"] is False
    assert isinstance(body["version"], str)
    assert root.sys.read_health_status(method="GET")["sealed"] is False
    assert http("HEAD", "/v1/sys/health", token=None).status_code == 200


@pytest.mark.parametrize(
    ("state", "status"),
    [("standby", 429), ("performance_standby", 473), ("dr_secondary", 472)],
)
def test_health_codes_for_ha_states(
    http: Http, emu: VaultEmulator, state: Any, status: int
) -> None:
    emu.set_ha_state(state)
    response = http("GET", "/v1/sys/health", token=None)
    assert response.status_code == status
    assert response.json()["sealed"] is False
    # a standby forwards to the active node: clients see the same answers
    assert http.root("POST", "/v1/secret/data/a", json={"data": {"k": "v"}}).status_code == 200


def test_health_codes_sealed_uninitialised_and_overrides(http: Http, emu: VaultEmulator) -> None:
    emu.set_ha_state("standby")
    assert http("GET", "/v1/sys/health?standbyok=true", token=None).status_code == 200
    assert http("GET", "/v1/sys/health?standbycode=299", token=None).status_code == 299
    emu.seal()
    response = http("GET", "/v1/sys/health", token=None)
    assert response.status_code == 503
    assert response.json()["sealed"] is True
    assert http("GET", "/v1/sys/health?sealedcode=200", token=None).status_code == 200
    emu.set_initialized(False)
    response = http("GET", "/v1/sys/health", token=None)
    assert response.status_code == 501
    assert response.json()["initialized"] is False


def test_sealed_vault_answers_503_to_everything_else(
    http: Http, emu: VaultEmulator, root: hvac.Client, make_client: ClientFactory
) -> None:
    role_id, secret_id = emu.add_approle("r")
    emu.seal()
    for method, path in (
        ("GET", "/v1/secret/data/x"),
        ("LIST", "/v1/secret/metadata/"),
        ("GET", "/v1/auth/token/lookup-self"),
        ("GET", "/v1/nomount/x"),
    ):
        response = http.root(method, path)
        assert (response.status_code, response.json()) == (503, SEALED), path
        assert response.headers["Content-Type"] == "application/json"
    assert http("GET", "/v1/secret/data/x", token=None).json() == SEALED
    with pytest.raises(hvac.exceptions.VaultDown) as caught:
        read(root, "x")
    assert caught.value.errors == ["Vault is sealed"]
    with pytest.raises(hvac.exceptions.VaultDown):
        make_client().auth.approle.login(role_id=role_id, secret_id=secret_id)
    assert root.sys.read_seal_status()["sealed"] is True
    assert root.sys.is_sealed() is True
    emu.unseal()
    assert root.sys.is_sealed() is False
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(root, "x")


def test_uninitialised_vault_is_sealed_for_requests(http: Http, emu: VaultEmulator) -> None:
    emu.set_initialized(False)
    assert http.root("GET", "/v1/secret/data/x").json() == SEALED
    status = http("GET", "/v1/sys/seal-status", token=None).json()
    assert (status["initialized"], status["sealed"]) == (False, True)


# --------------------------------------------------------------------------- namespaces


def test_namespaces_isolate_mounts_tokens_and_policies(
    make_client: ClientFactory, emu: VaultEmulator, http: Http
) -> None:
    emu.add_namespace("team")
    emu.enable_kv2("secret", namespace="team")
    emu.put_policy("rw", rule("secret/data/*", "create", "read", "update"), namespace="team")
    team_token = emu.create_token(policies=["rw"], namespace="team")
    team = make_client(team_token, namespace="team")
    kv(team).create_or_update_secret("reg/a", {"where": "team"})
    root = make_client(emu.root_token)
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(root, "reg/a")
    kv(root).create_or_update_secret("reg/a", {"where": "root"})
    assert read(team, "reg/a")["data"]["data"] == {"where": "team"}
    # the root namespace's root token reaches into the child namespace
    assert read(make_client(emu.root_token, namespace="team"), "reg/a")["data"]["data"] == {
        "where": "team"
    }
    # a child-namespace token is not valid in the root namespace
    response = http("GET", "/v1/secret/data/reg/a", token=team_token)
    assert (response.status_code, response.json()) == (403, INVALID_TOKEN)
    assert emu.kv_get("reg/a", namespace="team") == {"where": "team"}
    assert [r.namespace for r in emu.requests[-2:]] == ["team", ""]
    # a root-namespace token sees a child namespace's paths prefixed with its name
    plain = emu.create_token(policies=[_policy(emu, rule("secret/data/*", "read"))])
    response = http("GET", "/v1/secret/data/reg/a", token=plain, namespace="team")
    assert (response.status_code, response.json()) == (403, DENIED)
    prefixed = emu.create_token(policies=[_policy(emu, rule("team/secret/data/*", "read"))])
    response = http("GET", "/v1/secret/data/reg/a", token=prefixed, namespace="team")
    assert response.json()["data"]["data"] == {"where": "team"}


def test_hvac_does_not_read_vault_namespace(
    make_client: ClientFactory, emu: VaultEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_NAMESPACE", "team")
    client = make_client(emu.root_token)
    kv(client).create_or_update_secret("a", {"k": "v"})
    assert emu.requests[-1].namespace == ""
    assert emu.kv_get("a") == {"k": "v"}


def test_namespace_login(make_client: ClientFactory, emu: VaultEmulator) -> None:
    emu.add_namespace("team")
    role_id, secret_id = emu.add_approle("r", namespace="team")
    client = make_client(namespace="team")
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    assert client.is_authenticated()
    with pytest.raises(hvac.exceptions.Forbidden):  # no approle mount in the root namespace
        make_client().auth.approle.login(role_id=role_id, secret_id=secret_id)


# --------------------------------------------------------------------------- faults


def test_injected_status_then_healthy(root: hvac.Client, emu: VaultEmulator, http: Http) -> None:
    emu.kv_put("reg/a", {"k": "v"})
    fault = emu.inject(path_regex=r"/secret/data/", status=503, count=1, errors=["upstream down"])
    with pytest.raises(hvac.exceptions.VaultDown) as caught:
        read(root, "reg/a")
    assert caught.value.errors == ["upstream down"]
    assert fault.hits == 1
    assert read(root, "reg/a")["data"]["data"] == {"k": "v"}
    emu.inject(path_regex=r"/secret/data/", status=500)
    response = http.root("GET", "/v1/secret/data/reg/a")
    assert response.status_code == 500
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"errors": ["injected fault: HTTP 500"]}
    assert http.root("GET", "/v1/secret/metadata/reg/a").status_code == 200  # other paths fine
    emu.clear_faults()
    assert http.root("GET", "/v1/secret/data/reg/a").status_code == 200


def test_injected_latency(root: hvac.Client, emu: VaultEmulator) -> None:
    emu.kv_put("reg/a", {"k": "v"})
    emu.inject(path_regex=r"reg/a$", method="GET", delay=0.3, count=1)
    started = time.monotonic()
    assert read(root, "reg/a")["data"]["data"] == {"k": "v"}
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    read(root, "reg/a")
    assert time.monotonic() - started < 0.3


def test_injected_drop_closes_without_response(
    http: Http, emu: VaultEmulator, root: hvac.Client
) -> None:
    emu.kv_put("reg/a", {"k": "v"})
    emu.inject(path_regex=r"/secret/data/reg/a", drop=True, count=2)
    with pytest.raises(requests.ConnectionError):
        http.root("GET", "/v1/secret/data/reg/a")
    with pytest.raises(requests.ConnectionError):
        read(root, "reg/a")
    assert http.root("GET", "/v1/secret/data/reg/a").status_code == 200
    assert read(root, "reg/a")["data"]["data"] == {"k": "v"}
    statuses = [r.status for r in emu.requests if r.path == "/v1/secret/data/reg/a"]
    assert statuses == [None, None, 200, 200]


def test_client_timeout_during_injected_latency_leaves_the_server_healthy(
    http: Http, emu: VaultEmulator
) -> None:
    emu.inject(path_regex=r"/slow", delay=0.5, count=1)
    with pytest.raises(requests.Timeout):
        http.session.get(emu.url + "/v1/secret/data/slow", timeout=0.1)
    time.sleep(0.5)
    assert http("GET", "/v1/sys/health", token=None).status_code == 200
    with pytest.raises(ValueError, match="needs status, delay or drop"):
        emu.inject(path_regex="x")


# --------------------------------------------------------------------------- log & server hygiene


def test_request_log_records_presence_of_tokens_never_values(
    http: Http, emu: VaultEmulator, make_client: ClientFactory
) -> None:
    token = emu.create_token(ttl=60)
    role_id, secret_id = emu.add_approle("r")
    login = make_client()
    login.auth.approle.login(role_id=role_id, secret_id=secret_id)
    http("GET", "/v1/auth/token/lookup-self", token=token)
    http("GET", f"/v1/secret/data/{token}", token=token)  # even a token put in the URL
    http("GET", "/v1/sys/health", token=None)
    log = emu.requests
    assert [(r.method, r.path, r.token_present) for r in log[-3:]] == [
        ("GET", "/v1/auth/token/lookup-self", True),
        ("GET", "/v1/secret/data/<redacted>", True),
        ("GET", "/v1/sys/health", False),
    ]
    dumped = repr(log)
    for value in (token, emu.root_token, secret_id, login.token):
        assert value not in dumped


def test_listens_on_loopback_and_stop_closes_everything() -> None:
    # Other emulators (the session's) may be running: only this one's threads count.
    others = set(threading.enumerate())
    emu = VaultEmulator().start()
    assert emu.url.startswith("http://127.0.0.1:")
    port = emu.port
    assert port > 0
    idle = socket.create_connection(("127.0.0.1", port), timeout=2)  # an idle keep-alive
    session = requests.Session()
    session.trust_env = False
    try:
        assert session.get(emu.url + "/v1/sys/health", timeout=5).status_code == 200
        before = {t.name for t in threading.enumerate()}
        assert "vault-emulator" in before
        started = time.monotonic()
        emu.stop()
        assert time.monotonic() - started < 3
        emu.stop()  # idempotent
        assert idle.recv(1) == b""  # the server closed the idle connection
    finally:
        idle.close()
        session.close()
    alive = [
        t for t in threading.enumerate() if t.name.startswith("vault-emulator") and t not in others
    ]
    assert alive == []
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=1),
    ):
        pass
    assert emu.server_errors == []


def test_context_manager_and_direct_kv_helpers() -> None:
    with VaultEmulator() as emu:
        assert emu.kv_put("a/b", {"k": "v"}) == 1
        assert emu.kv_put("a/b", {"k": "w"}) == 2
        assert emu.kv_get("a/b") == {"k": "w"}
        assert emu.kv_get("a/b", version=1) == {"k": "v"}
        assert emu.kv_keys() == ["a/b"]
        metadata = emu.kv_metadata("a/b")
        assert metadata is not None
        assert metadata["current_version"] == 2
        assert emu.kv_get("missing") is None
    assert emu.server_errors == []
