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
from typing import Any


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
