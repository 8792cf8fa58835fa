"""ResolveCredentials on a real broker: DESIGN.md "Resolution", rule by rule."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import grpc
import pytest

from broker.security.principals import PrincipalsFile
from broker.v1 import credentials_pb2, credentials_pb2_grpc
from broker.v1 import image_hosts_pb2 as pb
from broker.v1.image_hosts_pb2_grpc import ImageHostServiceStub
from clients.channel import open_channel
from tests.support.broker_process import BrokerProcess
from tests.support.status import expect_error

pytestmark = pytest.mark.integration

LOCAL_TOKEN = "tok-local-3Xq"
GHCR_TOKEN = "tok-ghcr-all-8Lm"
ACME_TOKEN = "tok-ghcr-acme-5Rt"


@pytest.fixture
def resolver(broker: BrokerProcess) -> credentials_pb2_grpc.CredentialServiceStub:
    return credentials_pb2_grpc.CredentialServiceStub(broker.channel())


def resolve(
    stub: credentials_pb2_grpc.CredentialServiceStub, image: str
) -> credentials_pb2.ResolveCredentialsResponse:
    return stub.ResolveCredentials(credentials_pb2.ResolveCredentialsRequest(image=image))


def create(
    hosts: ImageHostServiceStub, image_host_id: str, url: str, username: str = "", token: str = ""
) -> None:
    hosts.CreateImageHost(
        pb.CreateImageHostRequest(
            image_host_id=image_host_id,
            image_host=pb.ImageHost(url=url, username=username, access_token=token),
        )
    )


def decoded_auth(value: str) -> dict[str, str]:
    # base64url *with* padding, as the Docker Engine API expects.
    assert len(value) % 4 == 0
    assert "+" not in value
    assert "/" not in value
    result: dict[str, str] = json.loads(base64.urlsafe_b64decode(value))
    return result


def test_unqualified_image_on_the_seeded_docker_hub_is_anonymous(
    resolver: credentials_pb2_grpc.CredentialServiceStub,
) -> None:
    answer = resolve(resolver, "ubuntu")
    assert answer.image == "docker.io/library/ubuntu:latest"
    assert answer.registry == "docker.io"
    assert answer.image_host == "imageHosts/docker-hub"
    assert answer.anonymous
    assert (answer.username, answer.secret, answer.registry_auth) == ("", "", "")
    assert answer.server_address == "https://index.docker.io/v1/"


def test_unqualified_image_goes_to_the_default_host(
    resolver: credentials_pb2_grpc.CredentialServiceStub, hosts: ImageHostServiceStub
) -> None:
    create(hosts, "local", "http://127.0.0.1:5000", "ci", LOCAL_TOKEN)
    hosts.SetDefaultImageHost(pb.SetDefaultImageHostRequest(name="imageHosts/local", reason="t"))
    answer = resolve(resolver, "team/tool:1.0")
    assert answer.image == "127.0.0.1:5000/team/tool:1.0"
    assert answer.image_host == "imageHosts/local"
    assert not answer.anonymous
    assert (answer.username, answer.secret) == ("ci", LOCAL_TOKEN)
    assert answer.plain_http
    assert answer.server_address == "127.0.0.1:5000"
    assert decoded_auth(answer.registry_auth) == {
        "username": "ci",
        "password": LOCAL_TOKEN,
        "serveraddress": "127.0.0.1:5000",
    }
    # library/ is added on Docker Hub only.
    assert resolve(resolver, "ubuntu").image == "127.0.0.1:5000/ubuntu:latest"


def test_default_host_with_a_prefix_takes_unqualified_images_below_it(
    resolver: credentials_pb2_grpc.CredentialServiceStub, hosts: ImageHostServiceStub
) -> None:
    create(hosts, "acme", "ghcr.io/acme", "bot", ACME_TOKEN)
    hosts.SetDefaultImageHost(pb.SetDefaultImageHostRequest(name="imageHosts/acme", reason="t"))
    answer = resolve(resolver, "tool@sha256:" + "a" * 64)
    assert answer.image == "ghcr.io/acme/tool@sha256:" + "a" * 64
    assert answer.secret == ACME_TOKEN


def test_qualified_image_gets_the_longest_matching_prefix(
    resolver: credentials_pb2_grpc.CredentialServiceStub, hosts: ImageHostServiceStub
) -> None:
    create(hosts, "ghcr", "ghcr.io", "all", GHCR_TOKEN)
    create(hosts, "ghcr-acme", "ghcr.io/acme", "acme-bot", ACME_TOKEN)
    expectations = {
        "ghcr.io/acme/app:2": ("imageHosts/ghcr-acme", ACME_TOKEN),
        "GHCR.io/acme/team/app": ("imageHosts/ghcr-acme", ACME_TOKEN),
        "ghcr.io/acme2/app": ("imageHosts/ghcr", GHCR_TOKEN),
        "ghcr.io/other/app": ("imageHosts/ghcr", GHCR_TOKEN),
    }
    for image, (host, secret) in expectations.items():
        answer = resolve(resolver, image)
        assert (answer.image_host, answer.secret) == (host, secret), image
        assert answer.registry == "ghcr.io"


def test_credentials_never_go_to_another_registry(
    resolver: credentials_pb2_grpc.CredentialServiceStub, hosts: ImageHostServiceStub
) -> None:
    create(hosts, "local", "http://127.0.0.1:5000", "ci", LOCAL_TOKEN)
    hosts.SetDefaultImageHost(pb.SetDefaultImageHostRequest(name="imageHosts/local", reason="t"))
    create(hosts, "acme", "ghcr.io/acme", "bot", ACME_TOKEN)
    for image in (
        "evil.example.com/team/tool:1.0",
        "127.0.0.1:5001/team/tool",
        "localhost:5000/team/tool",
        "ghcr.io/acmeevil/app",
        "docker.io/library/ubuntu",
    ):
        answer = resolve(resolver, image)
        assert answer.secret not in (LOCAL_TOKEN, ACME_TOKEN), image
        assert answer.registry_auth == "", image
        assert answer.anonymous, image


def test_identity_tokens_use_the_identitytoken_field(
    resolver: credentials_pb2_grpc.CredentialServiceStub, hosts: ImageHostServiceStub
) -> None:
    create(hosts, "acr", "acme.azurecr.io", "<token>", "refresh-token-9Zk")
    answer = resolve(resolver, "acme.azurecr.io/app:1")
    assert decoded_auth(answer.registry_auth) == {
        "identitytoken": "refresh-token-9Zk",
        "serveraddress": "acme.azurecr.io",
    }


@pytest.mark.parametrize(
    ("image", "rule"),
    [
        ("", "is required"),
        ("Ubuntu", "repository name must be lowercase"),
        ("https://ghcr.io/acme/app", "must not include a scheme"),
        ("ubuntu:-bad", "invalid tag"),
        ("ubuntu@sha256:abc", "invalid digest"),
        ("reg.io//x", "empty components"),
        ("f" * 64, "64-byte hexadecimal"),
    ],
)
def test_bad_references_are_invalid_argument_naming_the_rule(
    resolver: credentials_pb2_grpc.CredentialServiceStub, image: str, rule: str
) -> None:
    error = expect_error(lambda: resolve(resolver, image))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rule in error.violations["image"]


def test_disclosure_is_audited_without_the_secret(
    broker: BrokerProcess,
    resolver: credentials_pb2_grpc.CredentialServiceStub,
    hosts: ImageHostServiceStub,
) -> None:
    create(hosts, "acme", "ghcr.io/acme", "bot", ACME_TOKEN)
    resolve(resolver, "ghcr.io/acme/app:7")

    def records() -> list[dict[str, str]]:
        return [
            json.loads(line)
            for line in broker.text().splitlines()
            if line.startswith("{") and '"ResolveCredentials"' in line
        ]

    # The audit line is written before the answer, but read from the broker's
    # stderr by another thread: wait for it, bounded.
    deadline = time.monotonic() + 10
    while not records() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(records()) == 1
    record = records()[0]
    assert record["principal"] == "admin"
    assert record["image"] == "ghcr.io/acme/app:7"
    assert record["resolved_image"] == "ghcr.io/acme/app:7"
    assert record["disclosed"] == "yes"
    assert record["code"] == "OK"
    assert ACME_TOKEN not in broker.text()


def test_scoped_launcher_gets_only_its_hosts_credentials(
    broker: BrokerProcess, hosts: ImageHostServiceStub, tmp_path: Path
) -> None:
    create(hosts, "acme", "ghcr.io/acme", "bot", ACME_TOKEN)
    create(hosts, "local", "http://127.0.0.1:5000", "ci", LOCAL_TOKEN)
    token = PrincipalsFile(broker.data_dir / "principals.json").add(
        "team-acme", ["launcher"], image_hosts=["acme"]
    )
    assert token is not None
    with open_channel(broker.address, token=token) as channel:
        stub = credentials_pb2_grpc.CredentialServiceStub(channel)
        deadline = time.monotonic() + 10
        answer = None
        while answer is None:  # the broker re-reads the principals file within a second
            try:
                answer = resolve(stub, "ghcr.io/acme/app")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert answer.secret == ACME_TOKEN
        error = expect_error(lambda: resolve(stub, "127.0.0.1:5000/team/tool"))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.reason == "IMAGE_HOST_OUT_OF_SCOPE"
        assert LOCAL_TOKEN not in error.message
        # Anonymous resolutions disclose nothing and stay allowed.
        assert resolve(stub, "quay.io/x/y").anonymous
