"""Small building blocks of the Docker test bed: child processes, ports, bounded waits.

Every wait here has a deadline; every process started through `ManagedProcess`
is stopped by id (SIGTERM, then SIGKILL) and its output goes to a log file
that failures quote. Nothing here ever prints a password: callers pass
secrets through files or stdin, never argv or the environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
# Variables that would send the engine's or a registry's traffic elsewhere.
_SCRUBBED_PREFIXES = ("REGISTRY_", "DOCKER_", "CONTAINERD_")
_SCRUBBED_NAMES = {
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
}


class TestbedError(RuntimeError):
    """A part of the test bed is missing or did not come up. Never a skip."""

    __test__ = False


def require_binary(name: str, package: str) -> str:
    """The absolute path of `name`, or a loud failure naming the Debian package."""
    path = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin", "/usr/bin") if (p := Path(d) / name).exists()),
        None,
    )
    if path is None:
        raise TestbedError(
            f"{name} is not installed: the Debian package {package} is in DEB_PACKAGES, "
            "run `make setup`"
        )
    return path


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without proxies and without variables that reconfigure the servers."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SCRUBBED_NAMES and not key.startswith(_SCRUBBED_PREFIXES)
    }
    env.update(extra or {})
    return env


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Poll `check` until it returns something other than None; bounded by `timeout`.

    `alive` returns an explanation when the thing being waited for has died, which
    ends the wait at once with that explanation.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if alive is not None and (death := alive()) is not None:
            raise TestbedError(f"{what}: {death}")
        try:
            result = check()
        except OSError as error:
            last_error = error
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TestbedError(f"{what}: not ready after {timeout:.0f}s{detail}")
        time.sleep(POLL_INTERVAL)


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (the caller's server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ManagedProcess:
    """A child process whose stdout and stderr go to `log_path`; stopped by its pid.

    It is started through `setpriv --pdeathsig TERM` (util-linux; setpriv execs, so
    `pid` is the server's own): should the test process itself be killed before
    its teardown runs, the server still gets SIGTERM instead of running on.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else clean_environment()
        self._stdin = stdin
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise TestbedError(f"{self.name} was not started")
        return self._process

    def start(self) -> ManagedProcess:
        setpriv = require_binary("setpriv", "util-linux")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [setpriv, "--pdeathsig", "TERM", "--", *self.argv],
                stdin=self._stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )
        return self

    def death(self) -> str | None:
        """None while running; otherwise how it ended and the end of its log."""
        if self._process is None or self._process.poll() is None:
            return None
        return f"{self.name} exited with {self._process.returncode}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, then SIGKILL. Idempotent; returns the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout)
        if self._stdin is subprocess.PIPE and process.stdin is not None:
            process.stdin.close()
        return process.returncode


def run_checked(argv: Sequence[str], what: str, timeout: float = 20.0) -> str:
    """Run a short command; a failure raises with its exact output."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=clean_environment(),
    )
    if result.returncode != 0:
        raise TestbedError(
            f"{what} failed: `{' '.join(argv)}` exited with {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


def kill_pids(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the given pids, wait for them to go, then SIGKILL the rest."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        remaining = [pid for pid in remaining if _running(pid)]
        if remaining:
            time.sleep(POLL_INTERVAL)
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"
