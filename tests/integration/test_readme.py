"""The README's commands, run the way a reader runs them.

The broker is started with the documented `make run` (on a free port and a
fresh data directory, through CREDBROKER_PORT and CREDBROKER_DATA_DIR); then
every `grpcurl` and `credbroker` command line of the README's sh code blocks
runs, in README order, against it: the documented address 127.0.0.1:50051 is
replaced by the real one, and the one placeholder a reader fills in by hand,
`<etag>`, by the etag the broker last returned for that resource. Finally
SIGTERM must stop the broker gracefully. No access token from the README's
examples may appear in any output, and failure messages redact them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.v1 import image_hosts_pb2

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BIN = Path(sysconfig.get_path("scripts"))
DOC_ADDRESS = "127.0.0.1:50051"
ETAG_PLACEHOLDER = "<etag>"
SHELL_LANGUAGES = frozenset({"sh", "bash", "shell"})
RUNNABLE = frozenset({"grpcurl", "credbroker"})
SHELL_OPERATORS = frozenset("();<>|&")
START_TIMEOUT = 120.0  # `make run` first checks the setup targets
CALL_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# Set for grpcurl (-expand-headers) and the CLI once the broker writes an admin token.
TOKEN_VARIABLE = "CREDBROKER_TOKEN"
ADMIN_TOKEN_FILE = "admin.token"
#: The one RPC whose answer carries an access token on purpose.
DISCLOSING_RPC = "broker.v1.CredentialService/ResolveCredentials"
REDACTED = "[REDACTED]"
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")


@dataclass(frozen=True)
class ShellLine:
    lineno: int  # README line where the (possibly continued) command starts
    text: str  # backslash continuations joined


@dataclass(frozen=True)
class Command:
    lineno: int
    text: str
    argv: list[str]

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name


def shell_lines(markdown: str) -> list[ShellLine]:
    """Logical lines of the fenced sh/bash/shell code blocks, in order."""
    result: list[ShellLine] = []
    fence: str | None = None
    runnable = False
    pending: list[str] = []
    start = 0
    for lineno, line in enumerate(markdown.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence, runnable = match.group(1), match.group(2).lower() in SHELL_LANGUAGES
            continue
        if match and match.group(1).startswith(fence) and not match.group(2):
            assert not pending, f"README.md:{start}: backslash continuation runs off its block"
            fence = None
            continue
        if not runnable:
            continue
        if not pending:
            start = lineno
        stripped = line.rstrip()
        if stripped.endswith("\\") and not stripped.endswith("\\\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        result.append(ShellLine(start, " ".join(part.strip() for part in pending)))
        pending = []
    assert fence is None, "README.md: a code block is not closed"
    return result


def _uses_shell_operators(text: str) -> bool:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return any(token and set(token) <= SHELL_OPERATORS for token in lexer)


def readme_commands(markdown: str) -> list[Command]:
    """The grpcurl and credbroker command lines of the README, in order."""
    commands = []
    for line in shell_lines(markdown):
        argv = shlex.split(line.text, comments=True)
        if not argv or Path(argv[0]).name not in RUNNABLE:
            continue
        assert not _uses_shell_operators(line.text), (
            f"README.md:{line.lineno}: keep grpcurl/credbroker examples simple commands "
            "(no pipes, redirections or lists) so that this test can run them"
        )
        commands.append(Command(line.lineno, line.text, argv))
    return commands


def _access_tokens(commands: list[Command]) -> list[str]:
    """Values of every "access_token" in the README's request bodies."""
    tokens: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "access_token" and isinstance(item, str) and item:
                    tokens.append(item)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for command in commands:
        for body in _bodies(command.argv):
            walk(body)
    return tokens


def _bodies(argv: list[str]) -> Iterator[Any]:
    for flag, value in itertools.pairwise(argv):
        if flag == "-d" and value.startswith("{"):
            yield json.loads(value)


def _fill_etags(body: Any, etags: dict[str, str], lineno: int) -> Any:
    if isinstance(body, dict):
        filled = {key: _fill_etags(value, etags, lineno) for key, value in body.items()}
        if filled.get("etag") == ETAG_PLACEHOLDER:
            name = filled.get("name", "")
            assert name in etags, (
                f"README.md:{lineno}: no earlier answer carried the etag of {name}"
            )
            filled["etag"] = etags[name]
        return filled
    if isinstance(body, list):
        return [_fill_etags(item, etags, lineno) for item in body]
    return body


def _remember_etags(stdout: str, etags: dict[str, str]) -> None:
    try:
        answer = json.loads(stdout)
    except ValueError:
        return
    hosts = answer.get("image_hosts", [answer]) if isinstance(answer, dict) else []
    for host in hosts:
        if isinstance(host, dict) and host.get("name") and host.get("etag"):
            etags[host["name"]] = host["etag"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _group_members(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the live processes in process group `pgid` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append((int(entry.name), [a for a in argv if a]))
    return members


class MakeRun:
    """`make run` in its own process group, every line it prints captured."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.port = port
        self.data_dir = data_dir
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("CREDBROKER_") and key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
        }
        env.update(CREDBROKER_PORT=str(port), CREDBROKER_DATA_DIR=str(data_dir))
        self.output: list[str] = []
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self.process = subprocess.Popen(
            ["make", "run"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.output.append(line)
            match = _LISTENING.search(line)
            if match and int(match.group(1)) == self.port:
                self._listening.set()

    def text(self) -> str:
        with self._lock:
            return "".join(self.output)

    def wait_listening(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
        return True

    def broker_pid(self) -> int | None:
        """The `credbroker serve` process that make started."""
        for pid, argv in _group_members(self.process.pid):
            if "serve" in argv and any(Path(arg).name == "credbroker" for arg in argv[:2]):
                return pid
        return None

    def wait(self, timeout: float) -> int | None:
        """The exit status of make, or None if it is still running after `timeout`."""
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(10)
        return returncode

    def close(self) -> None:
        """Stop the whole process group, bounded: SIGTERM, then SIGKILL."""
        pgid = self.process.pid
        for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 10.0)):
            if not _group_members(pgid) and self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.process.poll() is not None and not _group_members(pgid):
                    break
                time.sleep(0.1)
        self.process.wait(10)
        self._reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[MakeRun]:
    run = MakeRun(tmp_path / "data", _free_port())
    try:
        yield run
    finally:
        run.close()


def test_readme_starts_with_the_setup_commands() -> None:
    lines = README.read_text().splitlines()
    assert lines[0] == "# credbroker"
    assert lines[1:3] == ["", "```sh"]
    end = lines.index("```", 3)
    commands = [shlex.split(line, comments=True) for line in lines[3:end]]
    assert commands == [["make", "run"], ["make", "test"]]


def test_readme_shows_every_image_host_rpc() -> None:
    commands = readme_commands(README.read_text())
    service = image_hosts_pb2.DESCRIPTOR.services_by_name["ImageHostService"]
    invoked = {arg for c in commands if c.program == "grpcurl" for arg in c.argv}
    missing = [m.name for m in service.methods if f"{service.full_name}/{m.name}" not in invoked]
    assert not missing, f"README.md has no grpcurl example for {missing}"
    assert f"describe {service.full_name}" in " ".join(
        " ".join(c.argv) for c in commands if c.program == "grpcurl"
    )
    for command in commands:
        if command.program == "grpcurl":
            assert DOC_ADDRESS in command.argv, f"README.md:{command.lineno}: use {DOC_ADDRESS}"


def test_readme_commands_run_in_order(make_run: MakeRun) -> None:
    commands = readme_commands(README.read_text())
    tokens = _access_tokens(commands)

    def redact(text: str) -> str:
        for token in sorted(tokens, key=len, reverse=True):
            text = text.replace(token, REDACTED)
        return text

    started = make_run.wait_listening()
    assert started, redact(f"`make run` did not start the broker:\n{make_run.text()}")
    address = f"127.0.0.1:{make_run.port}"

    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CREDBROKER_SERVER"] = address  # the CLI's address, for examples that leave it out
    admin_token_file = make_run.data_dir / ADMIN_TOKEN_FILE
    if admin_token_file.exists():
        token = admin_token_file.read_text().strip()
        tokens.append(token)
        env[TOKEN_VARIABLE] = token

    etags: dict[str, str] = {}
    outputs: list[tuple[str, str]] = []
    ran = 0
    for command in commands:
        starts_a_server = "serve" in command.argv and not {"-h", "--help"} & set(command.argv)
        if command.program == "credbroker" and starts_a_server:
            continue  # the broker under test is the one `make run` started
        argv = [str(BIN / command.program)]
        for arg in command.argv[1:]:
            arg = arg.replace(DOC_ADDRESS, address)
            if arg.startswith("{") and ETAG_PLACEHOLDER in arg:
                arg = json.dumps(_fill_etags(json.loads(arg), etags, command.lineno))
            argv.append(arg)
        where = f"README.md:{command.lineno}: {command.text}"
        try:
            done = subprocess.run(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            done = None  # its message quotes argv, tokens included: fail outside
        if done is None:
            pytest.fail(redact(f"{where}\ndid not finish in {CALL_TIMEOUT}s"))
        returncode = done.returncode
        assert returncode == 0, redact(
            f"{where}\nexited {returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
        if DISCLOSING_RPC in command.argv:
            # Its job is to hand the secret to an authorised launcher: check that
            # it did, and keep its answer out of the leak search below.
            assert any(token in done.stdout for token in tokens), redact(where)
            outputs.append((f"stderr of {where}", done.stderr))
        else:
            outputs += [(f"stdout of {where}", done.stdout), (f"stderr of {where}", done.stderr)]
        _remember_etags(done.stdout, etags)
        ran += 1
    assert ran >= 10, "README.md lost its grpcurl examples"

    # Stop the broker itself (make passes its exit status on) the way a
    # service manager does: SIGTERM, then a bounded wait.
    broker_pid = make_run.broker_pid()
    assert broker_pid is not None, "no `credbroker serve` process under `make run`"
    os.kill(broker_pid, signal.SIGTERM)
    returncode = make_run.wait(STOP_TIMEOUT)
    log = make_run.text()
    assert returncode == 0, redact(f"`make run` exited {returncode} after SIGTERM:\n{log}")
    assert re.search(r"\bstopped$", log, re.MULTILINE), redact(log)

    leaks = [
        f"README access token #{number} in {where}"
        for number, token in enumerate(tokens)
        for where, text in [*outputs, *(("broker output", line) for line in log.splitlines())]
        if token in text
    ]
    assert not leaks, redact("\n".join(leaks))


def test_markdown_parsing() -> None:
    markdown = "\n".join(
        [
            "text grpcurl -plaintext nope",
            "```sh",
            "export PATH=x",
            "grpcurl -plaintext -d '{\"a\": 1}' \\",
            "  127.0.0.1:50051 s/M   # comment",
            "```",
            "```text",
            "$ grpcurl not-run",
            "```",
            "~~~bash",
            "credbroker hosts list --server 127.0.0.1:50051",
            "~~~",
        ]
    )
    commands = readme_commands(markdown)
    assert [(c.lineno, c.argv) for c in commands] == [
        (4, ["grpcurl", "-plaintext", "-d", '{"a": 1}', "127.0.0.1:50051", "s/M"]),
        (11, ["credbroker", "hosts", "list", "--server", "127.0.0.1:50051"]),
    ]
    with pytest.raises(AssertionError, match="simple commands"):
        readme_commands("```sh\ngrpcurl a | jq .\n```\n")
    filled = _fill_etags(
        {"image_host": {"name": "imageHosts/x", "etag": ETAG_PLACEHOLDER}}, {"imageHosts/x": "7"}, 1
    )
    assert filled == {"image_host": {"name": "imageHosts/x", "etag": "7"}}
