"""HTTP servers that are not real registries, for negative and leak tests.

- `RecordingRegistry`: answers like a registry that wants credentials
  (`/v2/` -> 401 with a Basic or Bearer challenge and
  `Docker-Distribution-API-Version`) and records every request with its
  `Authorization` header, to prove credentials never reach another registry.
- `NotARegistry`: an ordinary web server: `/v2/` (and everything else) is an
  HTML page, 404 by default.
- `ClosedPort`: a 127.0.0.1 port with nothing listening (a bound socket that
  never listens holds it, so connections are refused and no one else takes it).
- `SilentPort`: accepts TCP connections (kernel backlog) and never answers.

Plain-HTTP servers here close a connection that starts with a TLS ClientHello
at once: the Docker engine tries HTTPS first on 127.0.0.0/8 registries and
would otherwise wait for its ~10 s handshake timeout on every request.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from tests.support.certificates import IssuedCertificate
from tests.support.docker_processes import LOOPBACK, TestbedError

TLS_HANDSHAKE = 0x16
PEEK_TIMEOUT = 5.0
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")


def reject_tls_handshake(connection: socket.socket) -> bool:
    """True (and the caller returns) when the client opened with TLS or sent nothing."""
    if isinstance(connection, ssl.SSLSocket):
        return False
    previous = connection.gettimeout()
    connection.settimeout(PEEK_TIMEOUT)
    try:
        first = connection.recv(1, socket.MSG_PEEK)
    except OSError:
        return True
    finally:
        connection.settimeout(previous)
    if not first or first[0] == TLS_HANDSHAKE:
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        return True
    return False


class PlainHandler(BaseHTTPRequestHandler):
    """Base of the fakes' handlers: HTTP/1.1, bounded reads, no TLS, no access log."""

    protocol_version = "HTTP/1.1"
    timeout = 10

    def handle(self) -> None:
        if reject_tls_handshake(self.connection):
            return
        super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        return


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request is not a test failure.
        return


class HttpServerThread:
    """A `ThreadingHTTPServer` on 127.0.0.1:<ephemeral> served from a thread."""

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        *,
        name: str,
        certificate: IssuedCertificate | None = None,
        host: str = LOOPBACK,
    ) -> None:
        self.name = name
        self._handler = handler
        self._certificate = certificate
        self._host = host
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self._certificate is not None else "http"

    @property
    def port(self) -> int:
        if self._server is None:
            raise TestbedError(f"{self.name} is not running")
        port: int = self._server.server_address[1]
        return port

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def start(self) -> HttpServerThread:
        server = _QuietServer((self._host, 0), self._handler)
        if self._certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self._certificate.cert, self._certificate.key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


Challenge = Literal["basic", "bearer", "none"]


class RecordingRegistry:
    """Looks like a registry that asks for credentials; records what clients send."""

    def __init__(
        self, challenge: Challenge = "basic", certificate: IssuedCertificate | None = None
    ) -> None:
        self.challenge = challenge
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._server = HttpServerThread(
            _handler(self._respond, self._record),
            name="recording registry",
            certificate=certificate,
        )

    @property
    def address(self) -> str:
        return self._server.address

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def authorizations(self) -> list[str]:
        """Every Authorization header received (empty when no credentials came)."""
        return [r.authorization for r in self.requests if r.authorization is not None]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _respond(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        headers = dict([API_VERSION])
        if path == "/token" or path.startswith("/token?"):
            return 401, {"WWW-Authenticate": 'Basic realm="recording"'}, b"{}"
        if self.challenge == "basic":
            headers["WWW-Authenticate"] = 'Basic realm="recording registry"'
        elif self.challenge == "bearer":
            headers["WWW-Authenticate"] = (
                f'Bearer realm="{self.url}/token",service="recording-registry"'
            )
        else:
            return (200 if path == "/v2/" else 404), headers, b"{}"
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        return 401, headers, body

    def start(self) -> RecordingRegistry:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


class NotARegistry:
    """A web server that is no registry: HTML everywhere, no API version header."""

    def __init__(self, status: int = 404) -> None:
        self.status = status
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._server = HttpServerThread(
            _handler(self._respond, self._record), name="not a registry"
        )

    @property
    def address(self) -> str:
        return self._server.address

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _respond(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        body = b"<!doctype html><html><head><title>Welcome</title></head><body>Hello</body></html>"
        return self.status, {"Content-Type": "text/html; charset=utf-8"}, body

    def start(self) -> NotARegistry:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


def _handler(
    respond: Callable[[str, str], tuple[int, dict[str, str], bytes]],
    record: Callable[[RecordedRequest], None],
) -> type[BaseHTTPRequestHandler]:
    class Handler(PlainHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length, 1 << 20))
            record(
                RecordedRequest(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                )
            )
            status, headers, body = respond(self.command, self.path)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler


class ClosedPort:
    """127.0.0.1:<port> where nothing listens: connecting is refused at once."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((LOOPBACK, 0))
        self.port: int = self._socket.getsockname()[1]

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def close(self) -> None:
        self._socket.close()


class SilentPort(ClosedPort):
    """127.0.0.1:<port> that accepts connections and never says anything."""

    def __init__(self) -> None:
        super().__init__()
        self._socket.listen(64)
