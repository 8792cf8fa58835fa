"""A real `credbroker serve` process on an ephemeral loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from broker.v1 import image_hosts_pb2_grpc
from clients.channel import open_channel, read_token_file

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
START_TIMEOUT = 30.0


#: Environment variables a broker under test never takes from the test run itself.
_NOT_INHERITED = frozenset(
    {"KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "DOCKER_HOST"}
)


class BrokerProcess:
    """Starts the broker as a child process and captures everything it prints."""

    def __init__(
        self,
        data_dir: Path,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self._command = list(command or [sys.executable, "-m", "broker.cli", "serve"])
        self._args = ["--port", "0", "--data-dir", str(data_dir), *args]
        # A cluster or engine of the machine running the tests is never the broker's,
        # unless a test names one (VAULT_* stays: the suite may run against a real Vault).
        inherited = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        self._env = {**inherited, **(env or {})}
        self.output: list[str] = []
        self._output_lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.port = 0
        self._listening = threading.Event()
        self._channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen[str]:
        assert self._process is not None, "broker not started"
        return self._process

    def start(self) -> BrokerProcess:
        self._process = subprocess.Popen(
            [*self._command, *self._args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._env,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening.wait(0.05):
            if self._process.poll() is not None:
                self._release()
                raise RuntimeError(f"broker exited with {self._process.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"broker did not start in {START_TIMEOUT}s:\n{self.text()}")
        return self

    def _read_output(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with self._output_lock:
                self.output.append(line)
            match = _LISTENING.search(line)
            if match and not self._listening.is_set():
                self.port = int(match.group(2))
                self._listening.set()

    def text(self) -> str:
        with self._output_lock:
            return "".join(self.output)

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

    def admin_token(self) -> str:
        return read_token_file(self.admin_token_path)

    def channel(self) -> grpc.Channel:
        """The admin's plaintext channel (the token created on first start)."""
        if self._channel is None:
            token = self.admin_token() if self.admin_token_path.exists() else None
            self._channel = open_channel(self.address, token=token)
        return self._channel

    def image_hosts(self) -> image_hosts_pb2_grpc.ImageHostServiceStub:
        return image_hosts_pb2_grpc.ImageHostServiceStub(self.channel())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        process = self.process
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                # Shown with a failing test: why the broker did not stop by itself.
                process.send_signal(signal.SIGUSR2)  # the broker dumps its threads
                time.sleep(1)
                print(f"broker did not stop in {timeout}s; its output:\n{self.text()[-6000:]}")
                process.kill()
                process.wait(10)
        self._release()
        return process.returncode

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
        self._release()

    def _release(self) -> None:
        if self._reader is not None:
            self._reader.join(10)
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
