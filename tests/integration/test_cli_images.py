"""`credbroker resolve`, `credbroker pull` and `credbroker hosts test`, as an operator runs them.

Every command is the installed console script in a subprocess, against a real
broker (env CREDBROKER_SERVER, CREDBROKER_TOKEN_FILE); pulls go through the test
bed's dockerd, connection tests to real registries. Secrets (access tokens,
registry passwords) are registered with `Secrets`: every output of every run is
checked for them, except the one run that asks for the secret with --show-secret.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import re
import secrets as random
import select
import struct
import subprocess
import sysconfig
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from broker.v1 import image_hosts_pb2 as pb
from tests.support.auth_helpers import Secrets
from tests.support.broker_process import BrokerProcess
from tests.support.docker_engine import DockerEngine
from tests.support.registry_servers import RegistryServer

pytestmark = pytest.mark.integration

CREDBROKER = Path(sysconfig.get_path("scripts")) / "credbroker"
RUN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    def fields(self) -> dict[str, str]:
        """`key: value` lines of stdout."""
        result = {}
        for line in self.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep and key and " " not in key:
                result[key] = value.strip()
        return result

    def json(self) -> Any:
        return json.loads(self.stdout)


class Cli:
    """Runs the console script against one broker; checks every output for secrets."""

    def __init__(self, broker: BrokerProcess, secrets: Secrets, cwd: Path) -> None:
        self.broker = broker
        self.secrets = secrets
        self.cwd = cwd
        secrets.add(broker.admin_token())

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
        env["CREDBROKER_SERVER"] = self.broker.address
        env["CREDBROKER_TOKEN_FILE"] = str(self.broker.admin_token_path)
        return env

    def __call__(self, *args: str, stdin: str = "", may_show_secrets: bool = False) -> Run:
        __tracebackhide__ = True
        completed = subprocess.run(
            [str(CREDBROKER), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.cwd,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        run = Run(completed.returncode, completed.stdout, completed.stderr)
        if not may_show_secrets:
            self.secrets.assert_absent(run.stdout, f"the stdout of credbroker {args[0]}")
        self.secrets.assert_absent(run.stderr, f"the stderr of credbroker {args[0]}")
        return run

    def on_a_terminal(self, *args: str) -> tuple[int, str]:
        """Run with stdout on a pseudo-terminal (200 columns); returns the code and output."""
        __tracebackhide__ = True
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        try:
            process = subprocess.Popen(
                [str(CREDBROKER), *args],
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.cwd,
            )
        finally:
            os.close(slave)
        chunks: list[bytes] = []
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.2)
                if not ready:
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal has gone
                    break
                if not data:
                    break
                chunks.append(data)
            returncode = process.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            os.close(master)
        output = b"".join(chunks).decode(errors="replace")
        self.secrets.assert_absent(output, f"the terminal output of credbroker {args[0]}")
        return returncode, output


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()


@pytest.fixture
def engine_broker(tmp_path: Path, docker_engine: DockerEngine) -> Iterator[BrokerProcess]:
    process = BrokerProcess(
        tmp_path / "data", env={"DOCKER_HOST": docker_engine.docker_host}
    ).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def cli(broker: BrokerProcess, secrets: Secrets, tmp_path: Path) -> Cli:
    """Against a broker without a Docker engine (resolve, hosts test)."""
    return Cli(broker, secrets, tmp_path)


@pytest.fixture
def engine_cli(engine_broker: BrokerProcess, secrets: Secrets, tmp_path: Path) -> Cli:
    """Against a broker whose engine is the test bed's dockerd (pull)."""
    return Cli(engine_broker, secrets, tmp_path)


def add_host(
    broker: BrokerProcess,
    image_host_id: str,
    url: str,
    username: str = "",
    token: str = "",
    *,
    default: bool = False,
) -> pb.ImageHost:
    hosts = broker.image_hosts()
    host = hosts.CreateImageHost(
        pb.CreateImageHostRequest(
            image_host_id=image_host_id,
            image_host=pb.ImageHost(url=url, username=username, access_token=token),
        )
    )
    if default:
        host = hosts.SetDefaultImageHost(
            pb.SetDefaultImageHostRequest(name=host.name, reason="test")
        )
    return host


def registry_host(
    cli: Cli, image_host_id: str, registry: RegistryServer, password: str | None = None
) -> pb.ImageHost:
    token = cli.secrets.add(registry.password if password is None else password)
    return add_host(cli.broker, image_host_id, registry.url, registry.username, token)


# -- resolve ------------------------------------------------------------------------------


def test_resolve_shows_the_account_and_the_secret_only_when_asked(cli: Cli) -> None:
    token = cli.secrets.add("cli-resolve-" + random.token_urlsafe(16))
    add_host(cli.broker, "local", "http://127.0.0.1:5000", "ci", token, default=True)

    run = cli("resolve", "team/tool:1.0")
    assert run.returncode == 0, run.stderr
    fields = run.fields()
    assert fields["image"] == "127.0.0.1:5000/team/tool:1.0"
    assert fields["registry"] == "127.0.0.1:5000"
    assert fields["image_host"] == "imageHosts/local"
    assert fields["username"] == "ci"
    assert fields["anonymous"] == "no"
    assert fields["secret"] == "(withheld; --show-secret prints it)"
    assert "registry_auth" not in fields  # it holds the secret, base64-encoded

    data = cli("resolve", "team/tool:1.0", "--json").json()
    assert data["image"] == "127.0.0.1:5000/team/tool:1.0"
    assert (data["image_host"], data["username"], data["anonymous"]) == (
        "imageHosts/local",
        "ci",
        False,
    )
    assert "secret" not in data
    assert "registry_auth" not in data

    shown = cli("resolve", "team/tool:1.0", "--show-secret", may_show_secrets=True)
    assert shown.returncode == 0, shown.stderr
    if shown.fields()["secret"] != token:
        pytest.fail("--show-secret did not print the host's access token")
    auth = json.loads(base64.urlsafe_b64decode(shown.fields()["registry_auth"]))
    assert (auth["username"], auth["serveraddress"]) == ("ci", "127.0.0.1:5000")
    data = cli("resolve", "team/tool:1.0", "--json", "--show-secret", may_show_secrets=True).json()
    if data["secret"] != token:
        pytest.fail("--json --show-secret did not give the host's access token")
    assert data["registry_auth"]


def test_resolve_anonymous_and_invalid_images(cli: Cli) -> None:
    fields = cli("resolve", "quay.io/acme/app@sha256:" + "b" * 64).fields()
    assert fields["image"] == "quay.io/acme/app@sha256:" + "b" * 64
    assert (fields["anonymous"], fields["username"], fields["secret"]) == ("yes", "-", "-")
    assert fields["image_host"].startswith("-")

    run = cli("resolve", "Ubuntu")
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "  image: invalid reference format: repository name must be lowercase" in (
        run.stderr.splitlines()
    )


# -- pull ---------------------------------------------------------------------------------


def test_pull_prints_plain_lines_and_the_digest(
    engine_cli: Cli, docker_scratch: DockerEngine, registry_basic: RegistryServer
) -> None:
    registry_host(engine_cli, "private", registry_basic)

    run = engine_cli("pull", registry_basic.image)

    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stdout
    assert "\r" not in run.stdout
    lines = run.stdout.splitlines()
    assert any(line.endswith(": Pull complete") for line in lines), lines
    # One line per change of a layer's status, not one per byte count.
    layer_lines = [line for line in lines if ": " in line and not line.startswith(" ")]
    assert len(layer_lines) == len(set(layer_lines)), lines
    fields = run.fields()
    assert fields["pulled"] == registry_basic.image
    assert fields["digest"] == registry_basic.image_digest
    assert fields["pinned_image"] == registry_basic.image_by_digest
    assert fields["image_host"] == "imageHosts/private"
    assert docker_scratch.run(registry_basic.image) == f"{registry_basic.image_marker}\n"

    # --json: one object per message, the result last.
    run = engine_cli("pull", registry_basic.image, "--json")
    assert run.returncode == 0, run.stderr
    messages = [json.loads(line) for line in run.stdout.splitlines()]
    assert all(set(m) == {"progress"} for m in messages[:-1])
    assert set(messages[0]["progress"]) == {"layer", "status", "current_bytes", "total_bytes"}
    assert messages[-1]["result"] == {
        "image": registry_basic.image,
        "digest": registry_basic.image_digest,
        "image_host": "imageHosts/private",
        "pinned_image": registry_basic.image_by_digest,
        "backend": "PULL_BACKEND_DOCKER",
        "nodes": [],
        # Not asked for (--show-registry-auth): the header, which holds the token, stays home.
        "registry_auth": "",
    }


def test_pull_on_a_terminal_redraws_layer_rows(
    engine_cli: Cli, docker_scratch: DockerEngine, registry_token: RegistryServer
) -> None:
    registry_host(engine_cli, "tokens", registry_token)

    returncode, output = engine_cli.on_a_terminal("pull", registry_token.image)

    assert returncode == 0, output
    assert "\x1b[1A" in output  # a layer's row is redrawn in place
    assert re.search(r": Downloading \[=*>? *\] [0-9.]+k?B/[0-9.]+[kMG]?B", output), output
    assert "Pull complete" in output
    assert f"digest:       {registry_token.image_digest}" in output
    assert docker_scratch.run(registry_token.image) == f"{registry_token.image_marker}\n"


def test_pull_failures_exit_1_with_the_error(
    engine_cli: Cli, docker_scratch: DockerEngine, registry_basic: RegistryServer
) -> None:
    engine_cli.secrets.add(registry_basic.password)
    registry_host(
        engine_cli, "private", registry_basic, password=registry_basic.password + "-wrong"
    )

    run = engine_cli("pull", registry_basic.image)
    assert run.returncode == 1
    assert run.stderr.startswith(
        "error: FAILED_PRECONDITION: the registry refused the credentials: "
    )
    assert "unauthorized: authentication required" in run.stderr
    assert "  error reason: REGISTRY_AUTH_FAILED" in run.stderr.splitlines()

    # With the right token, a tag that does not exist.
    engine_cli.broker.image_hosts().UpdateImageHost(
        pb.UpdateImageHostRequest(
            image_host=pb.ImageHost(
                name="imageHosts/private",
                username=registry_basic.username,
                access_token=registry_basic.password,
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["access_token"]),
        )
    )
    run = engine_cli("pull", f"{registry_basic.address}/team/tool:no-such-tag")
    assert run.returncode == 1
    assert run.stderr.startswith("error: NOT_FOUND: ")
    assert "  error reason: IMAGE_NOT_FOUND" in run.stderr.splitlines()

    run = engine_cli("pull", "Team/Tool")
    assert run.returncode == 1
    assert run.stderr.startswith("error: INVALID_ARGUMENT: ")


# -- hosts test ---------------------------------------------------------------------------


def test_hosts_test_prints_the_result_and_exits_1_unless_ok(
    cli: Cli, registry_basic_bare: RegistryServer
) -> None:
    registry = registry_basic_bare
    registry_host(cli, "good", registry)

    run = cli("hosts", "test", "good")
    assert run.returncode == 0, run.stderr
    fields = run.fields()
    assert fields["result"] == "OK"
    assert fields["message"] == "the registry accepted the credentials"
    assert fields["auth_scheme"] == "basic"
    assert fields["endpoint"] == f"{registry.url}/v2/"
    assert fields["latency"].endswith(" ms")

    data = cli("hosts", "test", "imageHosts/good", "--json").json()
    assert data["result"] == "TEST_IMAGE_HOST_RESULT_OK"
    assert data["latency"].endswith("s")
    assert set(data) == {"result", "message", "auth_scheme", "endpoint", "latency"}

    cli.broker.image_hosts().DeleteImageHost(pb.DeleteImageHostRequest(name="imageHosts/good"))
    registry_host(cli, "bad", registry, password="wrong-password-9Jd")
    run = cli("hosts", "test", "bad")
    assert run.returncode == 1
    assert run.fields()["result"] == "UNAUTHORIZED"
    assert "authentication required" in run.fields()["message"]

    run = cli("hosts", "test", "nope")
    assert run.returncode == 1
    assert run.stderr.startswith("error: NOT_FOUND: ")


def test_hosts_test_with_candidate_credentials(
    cli: Cli, registry_basic_bare: RegistryServer, tmp_path: Path
) -> None:
    registry = registry_basic_bare
    before = registry_host(cli, "stale", registry, password="stale-password-3Kp")
    password = cli.secrets.add(registry.password)
    token_file = tmp_path / "candidate.token"
    token_file.write_text(password + "\n")

    run = cli(
        "hosts",
        "test",
        "stale",
        "--candidate-username",
        registry.username,
        "--candidate-token-file",
        str(token_file),
    )
    assert run.returncode == 0, run.stderr
    assert run.fields()["result"] == "OK"

    run = cli(
        "hosts",
        "test",
        "stale",
        "--candidate-username",
        registry.username,
        "--candidate-token-stdin",
        stdin=password,
    )
    assert run.returncode == 0, run.stderr
    assert run.fields()["result"] == "OK"

    run = cli("hosts", "test", "stale", "--candidate-anonymous")
    assert run.returncode == 1
    assert run.fields()["message"] == "the registry requires credentials"

    # Never stored: the host is as it was, and its own token still fails.
    after = cli("hosts", "show", "stale", "--json").json()
    assert (after["etag"], after["access_token_set"]) == (before.etag, True)
    assert cli("hosts", "test", "stale").returncode == 1

    # A token on the command line is refused without being echoed.
    run = cli("hosts", "test", "stale", "--candidate-token", "cli-token-on-argv-6Tz")
    assert run.returncode == 2
    assert "cli-token-on-argv-6Tz" not in run.stderr
    assert "never taken on the command line" in run.stderr
    run = cli("hosts", "test", "stale", "--candidate-anonymous", "--candidate-username", "x")
    assert run.returncode == 2
