"""TLS and mutual TLS of a real `credbroker serve` process.

Certificates come from `tests.support.certificates` (a CA made by the tests,
a second unrelated CA, server certificates for 127.0.0.1/localhost, client
certificates with a subject CN and SAN URIs, expired ones). Every connection
goes to 127.0.0.1. Clients are the project's own `open_channel`, the real
grpcurl binary and the `credbroker` console script. Bearer tokens reach
grpcurl through an environment variable, never argv, and failure messages
redact them; private keys are only ever paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from broker.security.principals import PrincipalsFile
from broker.v1 import image_hosts_pb2, image_hosts_pb2_grpc
from clients.channel import open_channel
from tests.support.broker_process import BrokerProcess
from tests.support.certificates import CertificateAuthority, IssuedCertificate
from tests.support.status import expect_error

pytestmark = pytest.mark.integration

SCRIPTS = Path(sysconfig.get_path("scripts"))
GRPCURL = SCRIPTS / "grpcurl"
CREDBROKER = SCRIPTS / "credbroker"
LIST_METHOD = "broker.v1.ImageHostService/ListImageHosts"
SEEDED_HOST = "imageHosts/docker-hub"
CALL_TIMEOUT = 10.0
RUN_TIMEOUT = 60.0
POLL_TIMEOUT = 15.0
POLL_INTERVAL = 0.1
# grpcurl -expand-headers reads the bearer token from this variable: never on argv.
TOKEN_VARIABLE = "CREDBROKER_TOKEN"
# grpcurl exits with 64 + the gRPC status code when the RPC itself fails.
GRPCURL_UNAUTHENTICATED = 64 + grpc.StatusCode.UNAUTHENTICATED.value[0]
# ...and with 1 when it cannot even connect (TLS handshake included).
GRPCURL_DIAL_FAILED = 1
# A refused handshake may otherwise be retried until grpcurl's 10 s connect timeout.
DIAL_FAST = ("-connect-timeout", "3")
REDACTED = "[REDACTED]"

# Not loopback: the broker may bind it (port 0), tests only ever connect via 127.0.0.1.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
VIEWER_CN = "viewer-node"
SPIFFE_ID = "spiffe://credbroker.test/ns/ci/sa/launcher"
URN_ID = "urn:credbroker:workload:7"
# Principals of the mutual-TLS broker, mapped by certificate identity only.
CERT_PRINCIPALS = {
    "viewer-node": (["viewer"], [f"cn:{VIEWER_CN}"]),
    "ci-launcher": (["launcher"], [f"uri:{SPIFFE_ID}"]),
    "urn-workload": (["launcher"], [f"uri:{URN_ID}"]),
}


# -- certificates ----------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    #: A second CA that has nothing to do with the broker.
    other_ca: CertificateAuthority
    server: IssuedCertificate
    #: CN mapped to the `viewer-node` principal.
    viewer: IssuedCertificate
    #: Unmapped CN; its SAN URI is mapped to `ci-launcher`.
    workload: IssuedCertificate
    #: Unmapped CN; its SAN URI (an URN, no "://") is mapped to `urn-workload`.
    urn_workload: IssuedCertificate
    #: Unmapped CN; a SAN *DNS name* that spells the mapped SPIFFE id.
    impostor: IssuedCertificate
    #: Valid, signed by the CA, mapped to nobody.
    stranger: IssuedCertificate
    #: The viewer's CN, but expired.
    expired_viewer: IssuedCertificate
    #: The viewer's CN, signed by the other CA.
    foreign_viewer: IssuedCertificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority("broker", directory)
    other = CertificateAuthority("other", directory / "other")
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.server(),
        viewer=ca.client(VIEWER_CN),
        workload=ca.client("ci-runner-42", uris=[SPIFFE_ID]),
        urn_workload=ca.client("urn-holder", uris=[URN_ID]),
        impostor=ca.client("impostor", dns_names=[SPIFFE_ID]),
        stranger=ca.client("stranger"),
        expired_viewer=ca.client(VIEWER_CN, label="expired-viewer", expired=True),
        foreign_viewer=other.client(VIEWER_CN, label="foreign-viewer"),
    )


# -- helpers ---------------------------------------------------------------------


def redact(text: str, *secrets: str) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


@contextlib.contextmanager
def running_broker(data_dir: Path, args: Sequence[str]) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(data_dir, args=args).start()
    try:
        yield broker
    finally:
        broker.stop()


def tls_args(cert: Path, key: Path, client_ca: Path | None = None) -> list[str]:
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    if client_ca is not None:
        args += ["--client-ca", str(client_ca)]
    return args


@contextlib.contextmanager
def image_hosts(
    broker: BrokerProcess,
    *,
    ca: Path | None = None,
    client: IssuedCertificate | None = None,
    token: str | None = None,
    server_name: str | None = None,
) -> Iterator[image_hosts_pb2_grpc.ImageHostServiceStub]:
    """A stub on its own channel (TLS when `ca` or `client` is given), closed afterwards."""
    channel = open_channel(
        broker.address,
        token=token,
        ca_file=ca,
        cert_file=client.cert if client else None,
        key_file=client.key if client else None,
        server_name=server_name,
    )
    try:
        yield image_hosts_pb2_grpc.ImageHostServiceStub(channel)
    finally:
        channel.close()


def listed(stub: image_hosts_pb2_grpc.ImageHostServiceStub) -> list[str]:
    response = stub.ListImageHosts(image_hosts_pb2.ListImageHostsRequest(), timeout=CALL_TIMEOUT)
    return [host.name for host in response.image_hosts]


def create_nothing(stub: image_hosts_pb2_grpc.ImageHostServiceStub) -> object:
    """CreateImageHost with an empty request: an admin gets INVALID_ARGUMENT, others
    PERMISSION_DENIED (permission is checked first); nothing is ever created."""
    return stub.CreateImageHost(image_hosts_pb2.CreateImageHostRequest(), timeout=CALL_TIMEOUT)


def wait_for(check: Callable[[], bool], timeout: float = POLL_TIMEOUT) -> bool:
    """Polls `check` until it is true (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def eventually(check: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT) -> None:
    if not wait_for(check, timeout):
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def lists_hosts(
    broker: BrokerProcess,
    *,
    ca: Path | None = None,
    client: IssuedCertificate | None = None,
    token: str | None = None,
) -> bool:
    """True when a new channel made with these credentials can list hosts."""
    try:
        with image_hosts(broker, ca=ca, client=client, token=token) as stub:
            return SEEDED_HOST in listed(stub)
    except grpc.RpcError:
        return False


def replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def audit_records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(
    command: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def grpcurl(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
    if token is not None:
        env[TOKEN_VARIABLE] = token
        args = ("-expand-headers", "-H", f"authorization: Bearer ${{{TOKEN_VARIABLE}}}", *args)
    return run([str(GRPCURL), *args], env)


def credbroker(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """The console script with no CREDBROKER_* settings and no admin.token to fall back on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    env["XDG_DATA_HOME"] = str(home)
    return run([str(CREDBROKER), *args], env)


def outputs(completed: subprocess.CompletedProcess[str], *secrets: str) -> str:
    return redact(f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}", *secrets)


# -- brokers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[BrokerProcess]:
    """TLS with the server certificate only: no client certificates are requested."""
    data_dir = tmp_path_factory.mktemp("tls") / "data"
    # Provisioned before the first start, so nothing has to wait for a reload (and no
    # polling with a token eats into the failed-authentication budget of 127.0.0.1):
    # the admin, whose token file the broker would otherwise write, and the viewer's
    # CN, which TLS without a client CA must ignore.
    principals = PrincipalsFile(data_dir / "principals.json")
    token = principals.add("admin", ["admin"])
    assert token is not None
    fd = os.open(data_dir / "admin.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    principals.add(
        "viewer-node", ["viewer"], certificate_identities=[f"cn:{VIEWER_CN}"], with_token=False
    )
    with running_broker(data_dir, tls_args(pki.server.cert, pki.server.key)) as broker:
        yield broker


@dataclass(frozen=True)
class MtlsBroker:
    process: BrokerProcess
    audit_log: Path


@pytest.fixture(scope="module")
def mtls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[MtlsBroker]:
    """Mutual TLS: client certificates signed by the CA are required."""
    base = tmp_path_factory.mktemp("mtls")
    audit_log = base / "audit.jsonl"
    args = [
        *tls_args(pki.server.cert, pki.server.key, pki.ca.cert),
        "--audit-log",
        str(audit_log),
    ]
    with running_broker(base / "data", args) as broker:
        principals = PrincipalsFile(base / "data" / "principals.json")
        for name, (roles, identities) in CERT_PRINCIPALS.items():
            principals.add(name, roles, certificate_identities=identities, with_token=False)
        eventually(
            lambda: lists_hosts(broker, ca=pki.ca.cert, client=pki.viewer),
            "the mutual-TLS broker to pick up the certificate principals",
        )
        yield MtlsBroker(broker, audit_log)


# -- TLS -------------------------------------------------------------------------


def test_tls_client_trusting_the_ca_lists_hosts_with_the_admin_token(
    tls_broker: BrokerProcess, pki: Pki
) -> None:
    token = tls_broker.admin_token()
    with image_hosts(tls_broker, ca=pki.ca.cert, token=token) as stub:
        assert SEEDED_HOST in listed(stub)
    # The certificate also names `localhost`; a name it does not hold is refused.
    with image_hosts(tls_broker, ca=pki.ca.cert, token=token, server_name="localhost") as stub:
        assert SEEDED_HOST in listed(stub)
    with image_hosts(
        tls_broker, ca=pki.ca.cert, token=token, server_name="broker.example.org"
    ) as stub:
        assert expect_error(lambda: listed(stub)).code == grpc.StatusCode.UNAVAILABLE
    assert "listening on 127.0.0.1:" in tls_broker.text()
    assert f":{tls_broker.port} (TLS," in tls_broker.text()


def test_tls_alone_authenticates_nobody(tls_broker: BrokerProcess, pki: Pki) -> None:
    with image_hosts(tls_broker, ca=pki.ca.cert) as stub:
        error = expect_error(lambda: listed(stub))
    assert (error.code, error.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIALS_REQUIRED",
    )
    # Without a client CA the server asks for no client certificate, so a
    # certificate whose CN is mapped (to viewer-node here) identifies nobody.
    with image_hosts(tls_broker, ca=pki.ca.cert, client=pki.viewer) as stub:
        error = expect_error(lambda: listed(stub))
    assert (error.code, error.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIALS_REQUIRED",
    )


def test_tls_client_that_does_not_trust_the_ca_is_unavailable(
    tls_broker: BrokerProcess, pki: Pki
) -> None:
    with image_hosts(tls_broker, ca=pki.other_ca.cert, token=tls_broker.admin_token()) as stub:
        error = expect_error(lambda: listed(stub))
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_of_a_tls_broker_is_unavailable(tls_broker: BrokerProcess) -> None:
    with image_hosts(tls_broker, token=tls_broker.admin_token()) as stub:
        error = expect_error(lambda: listed(stub))
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_grpcurl_with_cacert_and_a_bearer_token_from_the_environment(
    tls_broker: BrokerProcess, pki: Pki
) -> None:
    token = tls_broker.admin_token()
    address = tls_broker.address
    ok = grpcurl("-cacert", str(pki.ca.cert), address, LIST_METHOD, token=token)
    assert ok.returncode == 0, outputs(ok, token)
    assert SEEDED_HOST in [h["name"] for h in json.loads(ok.stdout)["image_hosts"]]
    assert token not in ok.stdout + ok.stderr

    no_token = grpcurl("-cacert", str(pki.ca.cert), address, LIST_METHOD)
    assert no_token.returncode == GRPCURL_UNAUTHENTICATED, outputs(no_token)
    untrusted = grpcurl(*DIAL_FAST, "-cacert", str(pki.other_ca.cert), address, LIST_METHOD)
    assert untrusted.returncode == GRPCURL_DIAL_FAILED, outputs(untrusted)
    assert "certificate signed by unknown authority" in untrusted.stderr
    plaintext = grpcurl(*DIAL_FAST, "-plaintext", address, LIST_METHOD, token=token)
    assert plaintext.returncode == GRPCURL_DIAL_FAILED, outputs(plaintext, token)
    assert "Failed to dial target host" in plaintext.stderr


# -- mutual TLS ------------------------------------------------------------------


def test_a_mapped_common_name_is_the_principal_without_a_token(
    mtls_broker: MtlsBroker, pki: Pki
) -> None:
    with image_hosts(mtls_broker.process, ca=pki.ca.cert, client=pki.viewer) as stub:
        assert SEEDED_HOST in listed(stub)
        error = expect_error(lambda: create_nothing(stub))
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
    assert "principal viewer-node (roles: viewer)" in error.message
    denied = [
        r for r in audit_records(mtls_broker.audit_log) if r.get("audit") == "CreateImageHost"
    ]
    assert denied
    assert (denied[-1]["principal"], denied[-1]["code"]) == ("viewer-node", "PERMISSION_DENIED")


def test_a_mapped_spiffe_uri_is_the_principal(mtls_broker: MtlsBroker, pki: Pki) -> None:
    # The certificate's CN (ci-runner-42) is mapped to nobody: the SAN URI decides.
    with image_hosts(mtls_broker.process, ca=pki.ca.cert, client=pki.workload) as stub:
        assert SEEDED_HOST in listed(stub)
        error = expect_error(lambda: create_nothing(stub))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "principal ci-launcher (roles: launcher)" in error.message


def test_a_mapped_urn_uri_is_the_principal(mtls_broker: MtlsBroker, pki: Pki) -> None:
    with image_hosts(mtls_broker.process, ca=pki.ca.cert, client=pki.urn_workload) as stub:
        assert SEEDED_HOST in listed(stub)


def test_a_dns_name_that_spells_a_mapped_uri_identifies_nobody(
    mtls_broker: MtlsBroker, pki: Pki
) -> None:
    with image_hosts(mtls_broker.process, ca=pki.ca.cert, client=pki.impostor) as stub:
        error = expect_error(lambda: listed(stub))
    assert (error.code, error.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "UNKNOWN_CERTIFICATE",
    )


@pytest.mark.parametrize(
    "client",
    ["expired_viewer", "foreign_viewer", None],
    ids=["expired-certificate", "certificate-of-another-ca", "no-certificate-but-a-token"],
)
def test_the_handshake_rejects_a_client_without_a_valid_certificate(
    mtls_broker: MtlsBroker, pki: Pki, client: str | None
) -> None:
    broker = mtls_broker.process
    audited = len(audit_records(mtls_broker.audit_log))
    certificate = getattr(pki, client) if client else None
    # The rejected certificates carry the mapped viewer CN, and the certificate-less
    # client sends the admin token: only the handshake can be what refuses them.
    token = None if client else broker.admin_token()
    with image_hosts(broker, ca=pki.ca.cert, client=certificate, token=token) as stub:
        error = expect_error(lambda: listed(stub))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    # No call reached the interceptor (which audits every refusal it makes).
    assert len(audit_records(mtls_broker.audit_log)) == audited
    assert broker.process.poll() is None


def test_an_unmapped_certificate_is_unauthenticated_unless_a_token_is_sent(
    mtls_broker: MtlsBroker, pki: Pki
) -> None:
    broker = mtls_broker.process
    with image_hosts(broker, ca=pki.ca.cert, client=pki.stranger) as stub:
        error = expect_error(lambda: listed(stub))
    assert (error.code, error.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "UNKNOWN_CERTIFICATE",
    )
    assert "cn:stranger" in error.message
    token = broker.admin_token()
    with image_hosts(broker, ca=pki.ca.cert, client=pki.stranger, token=token) as stub:
        assert SEEDED_HOST in listed(stub)


def test_a_bearer_token_wins_over_a_mapped_certificate(mtls_broker: MtlsBroker, pki: Pki) -> None:
    broker = mtls_broker.process
    token = broker.admin_token()
    # The viewer's certificate with the admin token: the admin may create hosts,
    # so the empty request gets past authorisation to validation.
    with image_hosts(broker, ca=pki.ca.cert, client=pki.viewer, token=token) as stub:
        error = expect_error(lambda: create_nothing(stub))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    # A wrong token is not rescued by the certificate.
    wrong = "cbt_" + "x" * 43
    with image_hosts(broker, ca=pki.ca.cert, client=pki.viewer, token=wrong) as stub:
        error = expect_error(lambda: listed(stub))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")


def test_grpcurl_with_a_client_certificate(mtls_broker: MtlsBroker, pki: Pki) -> None:
    address = mtls_broker.process.address
    ok = grpcurl(
        "-cacert",
        str(pki.ca.cert),
        "-cert",
        str(pki.viewer.cert),
        "-key",
        str(pki.viewer.key),
        address,
        LIST_METHOD,
    )
    assert ok.returncode == 0, outputs(ok)
    assert SEEDED_HOST in [h["name"] for h in json.loads(ok.stdout)["image_hosts"]]

    without = grpcurl(*DIAL_FAST, "-cacert", str(pki.ca.cert), address, LIST_METHOD)
    assert without.returncode == GRPCURL_DIAL_FAILED, outputs(without)
    assert "Failed to dial target host" in without.stderr


# -- certificate rotation --------------------------------------------------------


@dataclass(frozen=True)
class ServerFiles:
    cert: Path
    key: Path


def served_copy(pki: Pki, directory: Path) -> ServerFiles:
    """The server certificate and key copied where the test may replace them."""
    directory.mkdir()
    files = ServerFiles(directory / "server.pem", directory / "server-key.pem")
    files.cert.write_bytes(pki.server.cert_pem())
    files.key.write_bytes(pki.server.key_pem())
    files.key.chmod(0o600)
    return files


def assert_not_restarted(broker: BrokerProcess, pid: int) -> None:
    assert broker.process.pid == pid
    assert broker.process.poll() is None
    log = broker.text()
    assert log.count("listening on") == 1, log
    assert "stopped" not in log


def test_rotated_server_certificate_is_served_without_a_restart(tmp_path: Path, pki: Pki) -> None:
    files = served_copy(pki, tmp_path / "served")
    new_ca = CertificateAuthority("rotated", tmp_path / "rotated")
    new_server = new_ca.server()
    with running_broker(tmp_path / "data", tls_args(files.cert, files.key)) as broker:
        pid = broker.process.pid
        token = broker.admin_token()
        with image_hosts(broker, ca=pki.ca.cert, token=token) as before:
            assert SEEDED_HOST in listed(before)

            replace_atomically(files.key, new_server.key_pem())
            replace_atomically(files.cert, new_server.cert_pem())

            eventually(
                lambda: lists_hosts(broker, ca=new_ca.cert, token=token),
                "a new connection to verify against the new CA",
            )
            with image_hosts(broker, ca=pki.ca.cert, token=token) as old_trust:
                error = expect_error(lambda: listed(old_trust))
            assert error.code == grpc.StatusCode.UNAVAILABLE
            # The connection made before the rotation carries on.
            assert SEEDED_HOST in listed(before)
        assert_not_restarted(broker, pid)
        assert "TLS certificates reloaded" in broker.text()


def test_a_certificate_rotated_before_its_key_takes_effect_with_the_key(
    tmp_path: Path, pki: Pki
) -> None:
    files = served_copy(pki, tmp_path / "served")
    new_ca = CertificateAuthority("rotated", tmp_path / "rotated")
    new_server = new_ca.server()
    with running_broker(tmp_path / "data", tls_args(files.cert, files.key)) as broker:
        pid = broker.process.pid
        token = broker.admin_token()
        replace_atomically(files.cert, new_server.cert_pem())
        # The new certificate with the old key is no usable pair: the old one stays.
        assert lists_hosts(broker, ca=pki.ca.cert, token=token)
        assert not lists_hosts(broker, ca=new_ca.cert, token=token)
        replace_atomically(files.key, new_server.key_pem())
        eventually(
            lambda: lists_hosts(broker, ca=new_ca.cert, token=token),
            "the new pair to be served once its key is in place",
        )
        assert not lists_hosts(broker, ca=pki.ca.cert, token=token)
        assert_not_restarted(broker, pid)


def test_a_certificate_without_its_key_is_reported_not_announced(tmp_path: Path, pki: Pki) -> None:
    files = served_copy(pki, tmp_path / "served")
    new_server = CertificateAuthority("rotated", tmp_path / "rotated").server()
    with running_broker(tmp_path / "data", tls_args(files.cert, files.key)) as broker:
        token = broker.admin_token()
        replace_atomically(files.cert, new_server.cert_pem())
        assert lists_hosts(broker, ca=pki.ca.cert, token=token)
        warned = wait_for(lambda: "keeping the current TLS certificates" in broker.text(), 3.0)
        assert warned, "no warning about the certificate without its key"
        assert "TLS certificates reloaded" not in broker.text()


def test_a_half_written_certificate_keeps_the_current_one(tmp_path: Path, pki: Pki) -> None:
    files = served_copy(pki, tmp_path / "served")
    new_ca = CertificateAuthority("rotated", tmp_path / "rotated")
    new_server = new_ca.server()
    with running_broker(tmp_path / "data", tls_args(files.cert, files.key)) as broker:
        pid = broker.process.pid
        token = broker.admin_token()
        assert lists_hosts(broker, ca=pki.ca.cert, token=token)

        # Written in place and cut short, as by a copy that is still running.
        pem = new_server.cert_pem()
        files.cert.write_bytes(pem[: len(pem) // 2])
        with image_hosts(broker, ca=pki.ca.cert, token=token) as stub:
            assert SEEDED_HOST in listed(stub)
        eventually(
            lambda: "keeping the current TLS certificates" in broker.text(),
            "the broker to warn about the unusable certificate file",
        )
        assert "WARNING" in next(
            line for line in broker.text().splitlines() if "keeping the current TLS" in line
        )
        # Plain garbage is no better.
        files.cert.write_bytes(b"not a certificate\n")
        assert lists_hosts(broker, ca=pki.ca.cert, token=token)
        assert not lists_hosts(broker, ca=new_ca.cert, token=token)

        # Once the files are complete the new certificate is served.
        replace_atomically(files.key, new_server.key_pem())
        replace_atomically(files.cert, pem)
        eventually(
            lambda: lists_hosts(broker, ca=new_ca.cert, token=token),
            "the completed certificate to be served",
        )
        assert not lists_hosts(broker, ca=pki.ca.cert, token=token)
        assert_not_restarted(broker, pid)


# -- startup ---------------------------------------------------------------------


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`credbroker serve` that is expected to refuse to start (bounded by RUN_TIMEOUT)."""
    command = [sys.executable, "-m", "broker.cli", "serve", "--port", "0"]
    command += ["--data-dir", str(tmp_path / "data"), *args]
    try:
        return run(command)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`serve {' '.join(args)}` did not refuse to start; it kept running")


def assert_refused(completed: subprocess.CompletedProcess[str], message: str) -> str:
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output
    assert "listening on" not in output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "cannot start:" in line]
    assert len(errors) == 1, output
    assert message in errors[0], output
    return errors[0]


def test_plaintext_on_a_non_loopback_address_is_refused(tmp_path: Path) -> None:
    error = assert_refused(
        serve(tmp_path, "--address", ALL_INTERFACES),
        f"refusing to serve plaintext on {ALL_INTERFACES}",
    )
    assert "--insecure-allow-plaintext" in error
    assert "--tls-cert" in error


def test_plaintext_on_a_non_loopback_address_when_explicitly_allowed(tmp_path: Path) -> None:
    args = ["--address", ALL_INTERFACES, "--insecure-allow-plaintext"]
    with running_broker(tmp_path / "data", args) as broker:
        assert f"listening on {ALL_INTERFACES}:{broker.port} (plaintext" in broker.text()
        # Only ever reached through loopback.
        assert SEEDED_HOST in listed(broker.image_hosts())


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--tls-cert"], "TLS needs both --tls-cert and --tls-key"),
        (["--tls-key"], "TLS needs both --tls-cert and --tls-key"),
        (["--client-ca"], "--client-ca needs --tls-cert and --tls-key"),
        (["--tls-key", "--client-ca"], "TLS needs both --tls-cert and --tls-key"),
    ],
    ids=["cert-without-key", "key-without-cert", "client-ca-alone", "client-ca-without-cert"],
)
def test_incomplete_tls_options_are_refused(
    tmp_path: Path, pki: Pki, given: list[str], message: str
) -> None:
    files = {"--tls-cert": pki.server.cert, "--tls-key": pki.server.key, "--client-ca": pki.ca.cert}
    args = [part for option in given for part in (option, str(files[option]))]
    assert_refused(serve(tmp_path, *args), message)


@pytest.mark.parametrize("missing", ["--tls-cert", "--tls-key", "--client-ca"])
def test_a_missing_certificate_file_is_refused_clearly(
    tmp_path: Path, pki: Pki, missing: str
) -> None:
    files = {"--tls-cert": pki.server.cert, "--tls-key": pki.server.key, "--client-ca": pki.ca.cert}
    absent = tmp_path / "no-such-file.pem"
    args = [part for option, path in files.items() for part in (option, str(path))]
    args[args.index(missing) + 1] = str(absent)
    error = assert_refused(serve(tmp_path, *args), str(absent))
    assert "No such file" in error


def test_an_unusable_certificate_file_is_refused_clearly(tmp_path: Path, pki: Pki) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n")
    completed = serve(tmp_path, *tls_args(garbage, pki.server.key))
    assert_refused(completed, "unusable certificate, key or CA")


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    completed = serve(tmp_path, *tls_args(pki.server.cert, pki.stranger.key))
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output
    assert "listening on" not in output
    assert "Traceback" not in output


def test_a_key_that_does_not_match_the_certificate_is_refused_clearly(
    tmp_path: Path, pki: Pki
) -> None:
    completed = serve(tmp_path, *tls_args(pki.server.cert, pki.stranger.key))
    assert_refused(completed, "does not match")


# -- the CLI ---------------------------------------------------------------------


def test_cli_lists_hosts_over_mutual_tls_with_a_client_certificate(
    tmp_path: Path, mtls_broker: MtlsBroker, pki: Pki
) -> None:
    server = mtls_broker.process.address
    connection = ["--server", server, "--cacert", str(pki.ca.cert)]
    completed = credbroker(
        "hosts",
        "list",
        "--json",
        *connection,
        "--cert",
        str(pki.viewer.cert),
        "--key",
        str(pki.viewer.key),
        home=tmp_path,
    )
    assert completed.returncode == 0, outputs(completed)
    assert SEEDED_HOST in [h["name"] for h in json.loads(completed.stdout)["image_hosts"]]

    without = credbroker("hosts", "list", *connection, home=tmp_path)
    assert without.returncode != 0
    assert "Traceback" not in without.stderr


def test_cli_lists_hosts_over_tls_with_a_token_file(
    tmp_path: Path, tls_broker: BrokerProcess, pki: Pki
) -> None:
    token = tls_broker.admin_token()
    server = tls_broker.address
    completed = credbroker(
        "hosts",
        "list",
        "--json",
        "--server",
        server,
        "--cacert",
        str(pki.ca.cert),
        "--token-file",
        str(tls_broker.admin_token_path),
        home=tmp_path,
    )
    assert completed.returncode == 0, outputs(completed, token)
    assert SEEDED_HOST in [h["name"] for h in json.loads(completed.stdout)["image_hosts"]]
    assert token not in completed.stdout + completed.stderr

    untrusted = credbroker(
        "hosts",
        "list",
        "--server",
        server,
        "--cacert",
        str(pki.other_ca.cert),
        "--token-file",
        str(tls_broker.admin_token_path),
        home=tmp_path,
    )
    assert untrusted.returncode != 0
    assert "Traceback" not in untrusted.stderr
    assert token not in untrusted.stdout + untrusted.stderr
