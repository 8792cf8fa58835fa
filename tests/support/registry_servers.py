"""Real registries for tests: Debian `docker-registry` (distribution 2.8) processes.

`RegistryServer` writes a config (JSON, which distribution's YAML loader reads),
starts `/usr/bin/docker-registry serve <config>` on 127.0.0.1:<free port> (or,
through a `TestNetwork`, inside a network namespace), and waits until `GET /v2/`
answers with `Docker-Distribution-API-Version`. Authentication is one of

- `"htpasswd"`: a bcrypt htpasswd file for one generated user;
- `"token"`: distribution's token authentication against a `TokenServer`
  (`tests/support/registry_token_server.py`), which knows the same user;
- `None`: anonymous.

TLS uses a certificate from `RegistryCA` (the tests' `CertificateAuthority`,
able to put any IP address in the SAN).

`network` is anything with `guest_addresses`, `start_inside()` and
`create_connection()` (`NetworkNamespace`): a `TestNetwork`, reachable from this
host, or a namespace of the Swarm test bed that is not, where probes open their
socket inside the namespace. `listener` fixes where the registry listens (e.g.
only 127.0.0.1 inside a namespace) instead of a free port or the guests' :5000.

Passwords are generated, kept in `server.password` only, written nowhere but
as a bcrypt hash, excluded from `repr()`, and never logged.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import bcrypt
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.certificates import CertificateAuthority, IssuedCertificate
from tests.support.docker_processes import (
    LOOPBACK,
    ManagedProcess,
    TestbedError,
    clean_environment,
    free_port,
    require_binary,
    wait_until,
)

if TYPE_CHECKING:
    from tests.support.docker_engine import DockerEngine
    from tests.support.registry_token_server import TokenServer

START_TIMEOUT = 20.0
PROBE_TIMEOUT = 2.0
NAMESPACE_PORT = 5000
DEFAULT_REPOSITORY = "team/tool"
DEFAULT_TAG = "1.0"
_START_ATTEMPTS = 3
API_VERSION_HEADER = "Docker-Distribution-API-Version"

Auth = Literal["htpasswd", "token"] | None


class RegistryCA(CertificateAuthority):
    """`CertificateAuthority` that can also issue server certificates for other IPs."""

    def server_for(
        self, label: str, ip_addresses: Sequence[str], dns_names: Sequence[str] = ("localhost",)
    ) -> IssuedCertificate:
        san: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses
        ]
        san += [x509.DNSName(name) for name in dns_names]
        return self._issue(
            label, ip_addresses[0], san, ExtendedKeyUsageOID.SERVER_AUTH, expired=False
        )


def write_htpasswd(path: Path, username: str, password: str) -> Path:
    """A one-user htpasswd file with a bcrypt hash (`$2y$`, as htpasswd -B writes)."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    path.write_text(f"{username}:$2y${hashed.removeprefix('$2b$')}\n")
    path.chmod(0o600)
    return path


def encode_registry_auth(auth_config: dict[str, str]) -> str:
    """The X-Registry-Auth value: JSON, base64url with padding."""
    return base64.urlsafe_b64encode(json.dumps(auth_config).encode()).decode()


class NetworkNamespace(Protocol):
    """Where a registry can run besides this host's own network (see the module doc)."""

    @property
    def guest_addresses(self) -> list[str]: ...

    def start_inside(self, name: str, argv: Sequence[str], log_path: Path) -> ManagedProcess: ...

    def create_connection(self, address: tuple[str, int], timeout: float) -> socket.socket: ...


@dataclass(frozen=True)
class Listener:
    """Where a registry listens and how clients address it."""

    bind: str
    address: str
    #: More addresses of the same registry (aliases on a test network).
    aliases: tuple[str, ...] = ()


class RegistryServer:
    """One `docker-registry` process. Attributes are what tests use; see the module doc."""

    def __init__(
        self,
        name: str,
        work_dir: Path,
        *,
        auth: Auth = "htpasswd",
        certificate: IssuedCertificate | None = None,
        ca_path: Path | None = None,
        token_server: TokenServer | None = None,
        network: NetworkNamespace | None = None,
        username: str | None = None,
        listener: Listener | None = None,
    ) -> None:
        if auth == "token" and token_server is None:
            raise ValueError("a token registry needs its TokenServer")
        if (certificate is None) != (ca_path is None):
            raise ValueError("TLS needs both the server certificate and the CA path")
        self.name = name
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.certificate = certificate
        #: The CA that signed the registry's certificate (None without TLS).
        self.ca_path = ca_path
        self.token_server = token_server
        self.network = network
        self.username = username or f"{name}-user"
        self.password = secrets.token_urlsafe(24) if auth is not None else ""
        if auth == "token" and token_server is not None:
            token_server.add_user(self.username, self.password)
        self.storage = work_dir / "storage"
        self.config_path = work_dir / "config.json"
        self.log_path = work_dir / "registry.log"
        self.listener: Listener | None = None
        self._fixed_listener = listener
        self._process: ManagedProcess | None = None
        self.repository = DEFAULT_REPOSITORY
        self.tag = DEFAULT_TAG
        # Set by publish_image().
        self._image_digest: str | None = None
        self._image_marker: str | None = None

    def __repr__(self) -> str:
        return (
            f"RegistryServer(name={self.name!r}, url={self.url if self.listener else None!r}, "
            f"auth={self.auth!r}, username={self.username!r})"
        )

    # -- addresses -------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.certificate is not None else "http"

    @property
    def address(self) -> str:
        """`host:port` as clients (and image references) name this registry."""
        if self.listener is None:
            raise TestbedError(f"registry {self.name} is not running")
        return self.listener.address

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other `host:port` names of the same registry (same storage, same users)."""
        return self.listener.aliases if self.listener else ()

    @property
    def image(self) -> str:
        """The pushed private image, e.g. `127.0.0.1:41234/team/tool:1.0`."""
        return f"{self.address}/{self.repository}:{self.tag}"

    @property
    def image_digest(self) -> str:
        """The manifest digest of `image` (`sha256:…`), as the registry reported on push."""
        if self._image_digest is None:
            raise TestbedError(
                f"no image was pushed to registry {self.name}: use the fixture "
                f"`registry_{self.name.replace('-', '_')}`, not the bare one"
            )
        return self._image_digest

    @property
    def image_marker(self) -> str:
        """What `docker run <image>` prints (followed by a newline)."""
        self.image_digest  # noqa: B018 - raises when nothing was pushed
        assert self._image_marker is not None
        return self._image_marker

    @property
    def image_by_digest(self) -> str:
        return f"{self.address}/{self.repository}@{self.image_digest}"

    def auth_config(self, serveraddress: str | None = None) -> dict[str, str]:
        """docker-py's `auth_config` (the X-Registry-Auth JSON) for this registry."""
        return {
            "username": self.username,
            "password": self.password,
            "serveraddress": serveraddress or self.address,
        }

    def registry_auth(self) -> str:
        """The encoded X-Registry-Auth header value."""
        return encode_registry_auth(self.auth_config())

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> RegistryServer:
        binary = require_binary("docker-registry", "docker-registry")
        self.storage.mkdir(exist_ok=True)
        if self.auth == "htpasswd":
            write_htpasswd(self.work_dir / "htpasswd", self.username, self.password)
        for attempt in range(_START_ATTEMPTS):
            self.listener = self._choose_listener()
            self.config_path.write_text(json.dumps(self._config(), indent=2) + "\n")
            argv = [binary, "serve", str(self.config_path)]
            if self.network is not None:
                process = self.network.start_inside(f"registry {self.name}", argv, self.log_path)
            else:
                process = ManagedProcess(
                    f"registry {self.name}", argv, self.log_path, env=clean_environment()
                ).start()
            self._process = process
            try:
                wait_until(
                    self._probe,
                    timeout=START_TIMEOUT,
                    what=f"registry {self.name} at {self.url} (log {self.log_path})",
                    alive=process.death,
                )
                return self
            except TestbedError:
                process.stop()
                self._process = None
                port_taken = "address already in use" in process.log_tail()
                if not port_taken or attempt == _START_ATTEMPTS - 1:
                    raise
        raise TestbedError(f"registry {self.name} did not start")  # pragma: no cover

    def _choose_listener(self) -> Listener:
        if self._fixed_listener is not None:
            return self._fixed_listener
        if self.network is None:
            port = free_port()
            return Listener(f"{LOOPBACK}:{port}", f"{LOOPBACK}:{port}")
        guests = self.network.guest_addresses
        return Listener(
            f":{NAMESPACE_PORT}",
            f"{guests[0]}:{NAMESPACE_PORT}",
            tuple(f"{guest}:{NAMESPACE_PORT}" for guest in guests[1:]),
        )

    def _config(self) -> dict[str, object]:
        assert self.listener is not None
        http: dict[str, object] = {
            "addr": self.listener.bind,
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.certificate is not None:
            http["tls"] = {
                "certificate": str(self.certificate.cert),
                "key": str(self.certificate.key),
            }
        config: dict[str, object] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "fields": {"service": self.name}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.auth == "htpasswd":
            config["auth"] = {
                "htpasswd": {"realm": f"{self.name}-realm", "path": str(self.work_dir / "htpasswd")}
            }
        elif self.auth == "token":
            assert self.token_server is not None
            config["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.token_server.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.token_server.rootcertbundle),
                }
            }
        return config

    def _probe(self) -> int | None:
        """The status of `GET /v2/` when the answer is a registry's, else None."""
        status, headers = self.get("/v2/")
        return status if headers.get(API_VERSION_HEADER.lower()) else None

    def get(
        self, path: str, headers: dict[str, str] | None = None, address: str | None = None
    ) -> tuple[int, dict[str, str]]:
        """One HTTP(S) GET to the registry (CA-verified when TLS); status, lowercase headers."""
        host, port = (address or self.address).rsplit(":", 1)
        connection: http.client.HTTPConnection
        if self.network is not None:
            # The socket is opened where the registry is (its namespace may not be
            # reachable from here); TLS, when any, is verified just the same.
            sock = self.network.create_connection((host, int(port)), PROBE_TIMEOUT)
            if self.ca_path is not None:
                context = ssl.create_default_context(cafile=str(self.ca_path))
                try:
                    sock = context.wrap_socket(sock, server_hostname=host)
                except BaseException:
                    sock.close()
                    raise
            connection = http.client.HTTPConnection(host, int(port), timeout=PROBE_TIMEOUT)
            connection.sock = sock
        elif self.ca_path is not None:
            context = ssl.create_default_context(cafile=str(self.ca_path))
            connection = http.client.HTTPSConnection(
                host, int(port), context=context, timeout=PROBE_TIMEOUT
            )
        else:
            connection = http.client.HTTPConnection(host, int(port), timeout=PROBE_TIMEOUT)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}
        finally:
            connection.close()

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines) if self._process else ""

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- images ----------------------------------------------------------------------

    def publish_image(
        self,
        engine: DockerEngine,
        *,
        repository: str = DEFAULT_REPOSITORY,
        tag: str = DEFAULT_TAG,
        marker: str | None = None,
    ) -> str:
        """Import a busybox image printing `marker`, push it here, drop it from the engine.

        Sets `repository`, `tag`, `image_marker`, `image_digest`; returns the digest.
        Publishing the same image again only returns its digest.
        """
        marker = marker or f"credbroker-testbed-{self.name}-ok"
        if self._image_digest is not None and (repository, tag, marker) == (
            self.repository,
            self.tag,
            self._image_marker,
        ):
            return self._image_digest
        self.repository, self.tag = repository, tag
        reference = self.image
        engine.import_image(reference, marker)
        try:
            digest = engine.push(reference, self.auth_config() if self.auth is not None else None)
        finally:
            engine.remove_image(reference)
        self._image_digest, self._image_marker = digest, marker
        return digest
