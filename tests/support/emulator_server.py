"""The HTTP server under the Vault and Kubernetes emulators.

A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) that knows its connections
and worker threads, so that `stop()` of an emulator can cut every connection
and join every thread: nothing outlives a test. Errors other than a client
hanging up are kept in `errors` for the emulator's own checks.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


class EmulatorRequestHandler(BaseHTTPRequestHandler):
    """Connection plumbing of an emulator's request handler: tracked connections,
    TCP_NODELAY, no access log, bodies (plain or chunked) up to `max_request_bytes`."""

    protocol_version = "HTTP/1.1"
    timeout = 30.0  # an idle keep-alive connection is closed after this
    max_request_bytes = 1024 * 1024
    server: EmulatorServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without TCP_NODELAY (Go's default)
        # Nagle's algorithm and delayed ACKs add ~40 ms to every answer.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the emulator keeps its own request log, without tokens."""

    def send_response(self, code: int, message: str | None = None) -> None:
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def read_body(self) -> bytes | None:
        """The request body; None when it is over `max_request_bytes`."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            total = 0
            while total <= self.max_request_bytes:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
                total += size
            return None
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_request_bytes:
            return None
        return self.rfile.read(length) if length > 0 else b""


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # connections are closed and threads joined by the owner
    allow_reuse_address = False

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], errors: list[str], thread_name: str
    ) -> None:
        self._errors = errors
        self._thread_name = thread_name
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._workers: set[threading.Thread] = set()
        super().__init__(("127.0.0.1", 0), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        worker = threading.Thread(
            target=self._work, args=(request, client_address), name=self._thread_name
        )
        worker.daemon = True
        with self._lock:
            self._workers.add(worker)
        worker.start()

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is not an emulator bug; anything else is kept.
        if isinstance(sys.exc_info()[1], OSError):
            return
        self._errors.append(traceback.format_exc())

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def join_workers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))


class ServedEmulator:
    """Start, stop and `with` for an emulator served by an `EmulatorServer`.

    The emulator sets `_server = None`, `_thread = None`, `_stopping` (an Event its
    injected delays wait on) and `_server_errors` in its `__init__`, and says how to
    make its server in `_make_server`.
    """

    _server: EmulatorServer | None
    _thread: threading.Thread | None
    _stopping: threading.Event
    _server_errors: list[str]
    _thread_name = "emulator"

    def _make_server(self) -> EmulatorServer:
        raise NotImplementedError

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = self._make_server()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=self._thread_name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; join every thread (bounded)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.join_workers(timeout=5.0)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def server_errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions inside the emulator (should stay empty)."""
        return list(self._server_errors)
