"""The operator CLI, `credbroker hosts ...`, against a real broker process.

Every command runs the installed console script as a subprocess, as an
operator would. Access tokens are distinctive random values registered with
the `Cli` helper: every output of every command (and the broker's own log) is
checked for them, and failure messages say where a token showed up, never the
token itself.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.core.image_hosts import HOSTS_PREFIX
from broker.stores.file import FileStore
from broker.v1 import image_hosts_pb2, image_hosts_pb2_grpc
from tests.support.broker_process import BrokerProcess

pytestmark = pytest.mark.integration

CREDBROKER = Path(sysconfig.get_path("scripts")) / "credbroker"
RUN_TIMEOUT = 60.0
REDACTED = "[REDACTED]"
TABLE_HEADER = ["NAME", "DISPLAY NAME", "REGISTRY", "USERNAME", "TOKEN", "DEFAULT"]
HOST_JSON_KEYS = {
    "name",
    "display_name",
    "url",
    "registry",
    "repository_prefix",
    "plain_http",
    "username",
    "access_token_set",
    "default",
    "create_time",
    "update_time",
    "etag",
}


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


class Cli:
    """Runs `credbroker` and remembers every output for the leak check."""

    def __init__(self, server: str, cwd: Path, token_file: Path | None = None) -> None:
        self.server = server
        self.cwd = cwd
        self.token_file = token_file
        self.runs: list[Run] = []
        self.sensitive: list[str] = []
        if token_file is not None and token_file.exists():
            self.secret(token_file.read_text().strip())

    def secret(self, value: str) -> str:
        """Register a value that must never be printed (and that failure messages redact)."""
        self.sensitive.append(value)
        return value

    def redact(self, text: str) -> str:
        for value in self.sensitive:
            text = text.replace(value, REDACTED)
        return text

    def __call__(
        self,
        *args: str,
        stdin: str | None = None,
        server: str | None = "default",
        env: dict[str, str] | None = None,
    ) -> Run:
        command = [str(CREDBROKER), *args]
        if server is not None:
            command += ["--server", self.server if server == "default" else server]
        base = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
        if self.token_file is not None:
            base["CREDBROKER_TOKEN_FILE"] = str(self.token_file)
        completed = subprocess.run(
            command,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env={**base, **(env or {})},
            timeout=RUN_TIMEOUT,
            check=False,
        )
        run = Run(tuple(args), completed.returncode, completed.stdout, completed.stderr)
        self.runs.append(run)
        return run

    def ok(self, *args: str, **options: Any) -> Run:
        run = self(*args, **options)
        if run.returncode != 0:
            pytest.fail(
                f"credbroker {' '.join(args)} exited with {run.returncode}\n"
                f"stdout:\n{self.redact(run.stdout)}\nstderr:\n{self.redact(run.stderr)}"
            )
        return run

    def fails(self, *args: str, code: int = 1, **options: Any) -> Run:
        run = self(*args, **options)
        if run.returncode != code:
            pytest.fail(
                f"credbroker {' '.join(args)} exited with {run.returncode}, expected {code}\n"
                f"stdout:\n{self.redact(run.stdout)}\nstderr:\n{self.redact(run.stderr)}"
            )
        assert "Traceback" not in run.stderr
        return run

    def assert_no_secret_printed(self, *extra: tuple[str, str]) -> None:
        """No registered value in any output so far, nor in `extra` (label, text) pairs."""
        places = [
            (f"{stream} of `credbroker {' '.join(run.args)}`", text)
            for run in self.runs
            for stream, text in (("stdout", run.stdout), ("stderr", run.stderr))
        ]
        for label, text in [*places, *extra]:
            for index, value in enumerate(self.sensitive):
                if value in text:
                    pytest.fail(f"secret #{index} appears in the {label}")


@pytest.fixture
def cli(broker: BrokerProcess, tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(broker.address, tmp_path, broker.admin_token_path)
    yield runner
    runner.assert_no_secret_printed(("broker log", broker.text()))


def new_token(cli: Cli, label: str) -> str:
    return cli.secret(f"{label}-{secrets.token_hex(12)}")


def stored_token(broker: BrokerProcess, image_host_id: str) -> str:
    store = FileStore(broker.data_dir)
    try:
        entry = store.get(HOSTS_PREFIX + image_host_id)
    finally:
        store.close()
    assert entry is not None, f"{image_host_id} is not in the store"
    return str(entry.data["access_token"])


def assert_stored_token(cli: Cli, broker: BrokerProcess, image_host_id: str, token: str) -> None:
    # Compared here rather than with `assert ==`, whose report would print both values.
    if stored_token(broker, image_host_id) != token:
        pytest.fail(f"the store does not hold the expected access token for {image_host_id}")


def table(stdout: str) -> list[list[str]]:
    """The table of `hosts list`, as rows of cells (header first)."""
    lines = stdout.rstrip("\n").split("\n")
    header = lines[0]
    starts = [header.index(title) for title in TABLE_HEADER]
    assert starts == sorted(starts), header
    rows = []
    for line in lines:
        cells = [
            line[start:end].strip() for start, end in zip(starts, [*starts[1:], None], strict=True)
        ]
        rows.append(cells)
    return rows


def key_values(stdout: str, skip_headline: bool = False) -> dict[str, str]:
    lines = stdout.rstrip("\n").split("\n")[1 if skip_headline else 0 :]
    pairs = [line.split(":", 1) for line in lines]
    assert all(len(pair) == 2 for pair in pairs), stdout
    return {key: value.strip() for key, value in pairs}


def error_lines(run: Run) -> list[str]:
    return run.stderr.rstrip("\n").split("\n")


def create(
    hosts: image_hosts_pb2_grpc.ImageHostServiceStub, image_host_id: str, url: str
) -> image_hosts_pb2.ImageHost:
    return hosts.CreateImageHost(
        image_hosts_pb2.CreateImageHostRequest(
            image_host_id=image_host_id, image_host=image_hosts_pb2.ImageHost(url=url)
        ),
        timeout=10,
    )


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- list ------------------------------------------------------------------------


def test_list_shows_the_seeded_docker_hub_default(cli: Cli) -> None:
    # The address comes from CREDBROKER_SERVER here: no --server option.
    run = cli("hosts", "list", server=None, env={"CREDBROKER_SERVER": cli.server})
    assert run.returncode == 0, run.stderr
    assert table(run.stdout) == [
        TABLE_HEADER,
        ["docker-hub", "Docker Hub", "docker.io", "-", "-", "*"],
    ]
    assert run.stderr == ""

    listed = cli.ok("hosts", "list", "--json").json()
    assert set(listed) == {"image_hosts", "next_page_token"}
    assert listed["next_page_token"] == ""
    [seed] = listed["image_hosts"]
    assert set(seed) == HOST_JSON_KEYS
    assert seed["name"] == "imageHosts/docker-hub"
    assert seed["url"] == "https://index.docker.io/v1/"
    assert seed["registry"] == "docker.io"
    assert seed["default"] is True
    assert seed["access_token_set"] is False
    assert seed["username"] == ""


def test_list_follows_pagination_to_the_end(
    cli: Cli, hosts: image_hosts_pb2_grpc.ImageHostServiceStub
) -> None:
    for image_host_id, url in [
        ("alpha", "alpha.example.org"),
        ("beta", "ghcr.io/beta"),
        ("gamma", "http://127.0.0.1:5000"),
    ]:
        create(hosts, image_host_id, url)
    # The broker really cuts the list into pages of two.
    first = hosts.ListImageHosts(image_hosts_pb2.ListImageHostsRequest(page_size=2), timeout=10)
    assert len(first.image_hosts) == 2
    assert first.next_page_token

    rows = table(cli.ok("hosts", "list", "--page-size", "2").stdout)
    assert [row[0] for row in rows[1:]] == ["alpha", "beta", "docker-hub", "gamma"]
    assert rows[2][2] == "ghcr.io/beta"  # the repository prefix is part of REGISTRY
    assert [row[5] for row in rows[1:]] == ["", "", "*", ""]

    listed = cli.ok("hosts", "list", "--page-size", "2", "--json").json()
    assert [h["name"] for h in listed["image_hosts"]] == [
        "imageHosts/alpha",
        "imageHosts/beta",
        "imageHosts/docker-hub",
        "imageHosts/gamma",
    ]
    assert listed["next_page_token"] == ""


# -- add / show ------------------------------------------------------------------


def test_add_reads_the_token_from_a_file_or_stdin_and_never_prints_it(
    cli: Cli, broker: BrokerProcess, tmp_path: Path
) -> None:
    file_token = new_token(cli, "file")
    token_file = tmp_path / "token"
    token_file.write_text(file_token + "\n")
    run = cli.ok(
        "hosts",
        "add",
        "reg-file",
        "--url",
        "registry.example.org:5000",
        "--display-name",
        "Example registry",
        "--username",
        "ci",
        "--access-token-file",
        str(token_file),
    )
    assert run.stdout.split("\n")[0] == "created imageHosts/reg-file"
    shown = key_values(run.stdout, skip_headline=True)
    assert shown["access_token"] == "set"
    assert shown["username"] == "ci"
    assert shown["display_name"] == "Example registry"
    assert shown["registry"] == "registry.example.org:5000"
    assert_stored_token(cli, broker, "reg-file", file_token)  # the newline was dropped

    stdin_token = new_token(cli, "stdin")
    created = cli.ok(
        "hosts",
        "add",
        "imageHosts/reg-stdin",
        "--url",
        "ghcr.io/acme",
        "--username",
        "bob",
        "--access-token-stdin",
        "--json",
        stdin=stdin_token + "\r\n",
    ).json()
    assert set(created) == HOST_JSON_KEYS  # no access_token key, not even an empty one
    assert created["name"] == "imageHosts/reg-stdin"
    assert created["repository_prefix"] == "acme"
    assert created["access_token_set"] is True
    assert_stored_token(cli, broker, "reg-stdin", stdin_token)

    dash_token = new_token(cli, "dash")
    cli.ok(
        "hosts",
        "add",
        "reg-dash",
        "--url",
        "quay.io",
        "--username",
        "carol",
        "--access-token-file",
        "-",
        stdin=dash_token,
    )
    assert_stored_token(cli, broker, "reg-dash", dash_token)

    rows = {row[0]: row for row in table(cli.ok("hosts", "list").stdout)[1:]}
    assert rows["reg-file"][3:5] == ["ci", "set"]
    assert rows["reg-stdin"][3:5] == ["bob", "set"]
    assert rows["reg-dash"][3:5] == ["carol", "set"]
    for image_host_id in ("reg-file", "reg-stdin", "reg-dash"):
        cli.ok("hosts", "show", image_host_id)
        assert "access_token" not in cli.ok("hosts", "show", image_host_id, "--json").json()
    cli.ok("hosts", "list", "--json")

    cli.assert_no_secret_printed(("broker log", broker.text()))


def test_add_without_a_token_is_anonymous_and_an_empty_token_is_refused(cli: Cli) -> None:
    created = cli.ok("hosts", "add", "mirror", "--url", "mirror.example.org", "--json").json()
    assert created["username"] == ""
    assert created["access_token_set"] is False
    assert created["display_name"] == "mirror"

    run = cli.fails(
        "hosts",
        "add",
        "empty",
        "--url",
        "e.example.org",
        "--username",
        "u",
        "--access-token-stdin",
        stdin="\n",
    )
    assert error_lines(run) == ["error: the access token from standard input is empty"]
    cli.fails("hosts", "show", "empty")


def test_a_token_is_never_taken_on_the_command_line(cli: Cli) -> None:
    token = new_token(cli, "argv")
    for argv in (["--access-token", token], [f"--access-token={token}"]):
        run = cli.fails(
            "hosts", "add", "leaky", "--url", "quay.io", "--username", "u", *argv, code=2
        )
        assert "never taken on the command line" in run.stderr
        assert "--access-token-file" in run.stderr
        assert run.stdout == ""
    cli.assert_no_secret_printed()
    missing = cli.fails("hosts", "show", "leaky")
    assert error_lines(missing)[0] == "error: NOT_FOUND: imageHosts/leaky not found"


def test_show_accepts_the_id_or_the_resource_name(cli: Cli) -> None:
    by_id = cli.ok("hosts", "show", "docker-hub")
    by_name = cli.ok("hosts", "show", "imageHosts/docker-hub")
    assert by_id.stdout == by_name.stdout
    shown = key_values(by_id.stdout)
    assert list(shown) == [
        "name",
        "display_name",
        "url",
        "registry",
        "repository_prefix",
        "plain_http",
        "username",
        "access_token",
        "default",
        "create_time",
        "update_time",
        "etag",
    ]
    as_json = cli.ok("hosts", "show", "docker-hub", "--json").json()
    assert set(as_json) == HOST_JSON_KEYS
    assert shown["name"] == as_json["name"] == "imageHosts/docker-hub"
    assert shown["registry"] == "docker.io"
    assert shown["default"] == "yes"
    assert shown["access_token"] == "not set"
    assert shown["username"] == "-"
    assert shown["etag"] == as_json["etag"] != ""
    assert shown["create_time"] == as_json["create_time"]

    missing = cli.fails("hosts", "show", "nope")
    assert error_lines(missing) == [
        "error: NOT_FOUND: imageHosts/nope not found",
        "  error reason: IMAGE_HOST_NOT_FOUND",
    ]
    assert missing.stdout == ""


# -- update ----------------------------------------------------------------------


def test_update_changes_exactly_the_fields_given_as_options(
    cli: Cli, broker: BrokerProcess, tmp_path: Path
) -> None:
    first_token = new_token(cli, "first")
    token_file = tmp_path / "first"
    token_file.write_text(first_token)
    cli.ok(
        "hosts",
        "add",
        "local",
        "--url",
        "http://127.0.0.1:5000",
        "--username",
        "ci",
        "--access-token-file",
        str(token_file),
    )

    # Only display_name is in the mask: url, username and the token stay.
    run = cli.ok("hosts", "update", "local", "--display-name", "Local registry")
    assert run.stdout.split("\n")[0] == "updated imageHosts/local (display_name)"
    host = cli.ok("hosts", "show", "local", "--json").json()
    assert host["display_name"] == "Local registry"
    assert host["url"] == "http://127.0.0.1:5000"
    assert host["username"] == "ci"
    assert host["access_token_set"] is True
    assert_stored_token(cli, broker, "local", first_token)

    # A new account with its token.
    second_token = new_token(cli, "second")
    host = cli.ok(
        "hosts",
        "update",
        "imageHosts/local",
        "--username",
        "robot",
        "--access-token-stdin",
        "--json",
        stdin=second_token + "\n",
    ).json()
    assert host["username"] == "robot"
    assert host["display_name"] == "Local registry"
    assert host["access_token_set"] is True
    assert_stored_token(cli, broker, "local", second_token)

    # A new url without a new token: the old token belonged to the old registry.
    run = cli.ok("hosts", "update", "local", "--url", "http://127.0.0.1:5001")
    assert run.stdout.split("\n")[0] == "updated imageHosts/local (url)"
    shown = key_values(run.stdout, skip_headline=True)
    assert shown["access_token"] == "not set"
    assert shown["registry"] == "127.0.0.1:5001"
    assert shown["username"] == "robot"
    assert shown["display_name"] == "Local registry"
    assert "clears it" in run.stderr
    assert stored_token(broker, "local") == ""

    # A token alone, then --clear-access-token.
    third_token = new_token(cli, "third")
    host = cli.ok(
        "hosts", "update", "local", "--access-token-file", "-", "--json", stdin=third_token
    ).json()
    assert host["access_token_set"] is True
    assert host["url"] == "http://127.0.0.1:5001"
    assert_stored_token(cli, broker, "local", third_token)
    host = cli.ok("hosts", "update", "local", "--clear-access-token", "--json").json()
    assert host["access_token_set"] is False
    assert host["username"] == "robot"

    # No option at all is a usage error, and nothing is sent.
    before = cli.ok("hosts", "show", "local", "--json").json()
    run = cli.fails("hosts", "update", "local", code=2)
    assert "nothing to update" in run.stderr
    assert cli.ok("hosts", "show", "local", "--json").json()["etag"] == before["etag"]

    cli.assert_no_secret_printed(("broker log", broker.text()))


# -- set-default -----------------------------------------------------------------


def test_set_default_with_a_reason(
    cli: Cli, broker: BrokerProcess, hosts: image_hosts_pb2_grpc.ImageHostServiceStub
) -> None:
    create(hosts, "local", "http://127.0.0.1:5000")

    usage = cli.fails("hosts", "set-default", "local", code=2)
    assert "--reason" in usage.stderr
    blank = cli.fails("hosts", "set-default", "local", "--reason", "   ")
    assert error_lines(blank)[0].startswith("error: INVALID_ARGUMENT: ")
    assert "  reason: is required: say why the default changes" in error_lines(blank)

    run = cli.ok("hosts", "set-default", "local", "--reason", "CI images live here")
    assert run.stdout.split("\n")[0] == "imageHosts/local is now the default image host"
    assert key_values(run.stdout, skip_headline=True)["default"] == "yes"

    rows = {row[0]: row for row in table(cli.ok("hosts", "list").stdout)[1:]}
    assert rows["local"][5] == "*"
    assert rows["docker-hub"][5] == ""
    assert hosts.GetDefaultImageHost(
        image_hosts_pb2.GetDefaultImageHostRequest(), timeout=10
    ).name == ("imageHosts/local")

    # The reason reaches the audit trail (a JSON line of the broker's output).
    audit = [json.loads(line) for line in broker.text().splitlines() if line.startswith("{")]
    assert any(
        event.get("reason") == "CI images live here" and "imageHosts/local" in json.dumps(event)
        for event in audit
    ), audit

    missing = cli.fails("hosts", "set-default", "nope", "--reason", "typo")
    assert error_lines(missing)[0] == "error: NOT_FOUND: imageHosts/nope not found"


# -- remove ----------------------------------------------------------------------


def test_remove_of_the_default_fails_and_of_another_host_works(
    cli: Cli, hosts: image_hosts_pb2_grpc.ImageHostServiceStub
) -> None:
    run = cli.fails("hosts", "remove", "docker-hub")
    assert error_lines(run) == [
        "error: FAILED_PRECONDITION: imageHosts/docker-hub is the default image host; "
        "make another host the default first",
        "  error reason: DEFAULT_IMAGE_HOST_UNDELETABLE",
    ]
    assert run.stdout == ""
    cli.ok("hosts", "show", "docker-hub")

    create(hosts, "other", "other.example.org")
    create(hosts, "third", "third.example.org")
    run = cli.ok("hosts", "remove", "imageHosts/other")
    assert run.stdout == "deleted imageHosts/other\n"
    assert cli.ok("hosts", "remove", "third", "--json").json() == {}
    names = [h["name"] for h in cli.ok("hosts", "list", "--json").json()["image_hosts"]]
    assert names == ["imageHosts/docker-hub"]
    cli.fails("hosts", "remove", "other")


# -- errors ----------------------------------------------------------------------


def test_an_invalid_url_shows_the_field_violation(cli: Cli) -> None:
    run = cli.fails("hosts", "add", "bad", "--url", "ftp://registry.example.org")
    lines = error_lines(run)
    assert lines[0].startswith("error: INVALID_ARGUMENT: ")
    assert lines[1:] == [
        "  image_host.url: scheme must be http:// or https://",
        "  error reason: INVALID_ARGUMENT",
    ]
    assert run.stdout == ""

    run = cli.fails("hosts", "update", "docker-hub", "--url", "docker.io/Upper")
    assert any(line.startswith("  image_host.url: path components") for line in error_lines(run))
    assert cli.ok("hosts", "show", "docker-hub", "--json").json()["url"] == (
        "https://index.docker.io/v1/"
    )
    names = [h["name"] for h in cli.ok("hosts", "list", "--json").json()["image_hosts"]]
    assert "imageHosts/bad" not in names


def test_a_stale_etag_is_aborted(
    cli: Cli, hosts: image_hosts_pb2_grpc.ImageHostServiceStub
) -> None:
    create(hosts, "local", "http://127.0.0.1:5000")
    stale = cli.ok("hosts", "show", "local", "--json").json()["etag"]
    cli.ok("hosts", "update", "local", "--display-name", "First", "--etag", stale)

    expected = [
        "error: ABORTED: etag does not match the current version of imageHosts/local; "
        "read it again and retry",
        "  error reason: ETAG_MISMATCH",
    ]
    run = cli.fails("hosts", "update", "local", "--display-name", "Second", "--etag", stale)
    assert error_lines(run) == expected
    run = cli.fails("hosts", "remove", "local", "--etag", stale)
    assert error_lines(run) == expected
    run = cli.fails("hosts", "set-default", "local", "--reason", "r", "--etag", stale)
    assert error_lines(run) == expected

    current = cli.ok("hosts", "show", "local", "--json").json()
    assert current["display_name"] == "First"
    assert current["default"] is False
    cli.ok("hosts", "remove", "local", "--etag", current["etag"])
    cli.fails("hosts", "show", "local")


def test_no_server_gives_a_clear_unavailable_error(tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"
    cli = Cli(address, tmp_path)
    token = new_token(cli, "offline")
    (tmp_path / "token").write_text(token)

    runs = [
        cli.fails("hosts", "list", "--timeout", "5"),
        cli.fails("hosts", "show", "docker-hub", server=None, env={"CREDBROKER_SERVER": address}),
        cli.fails(
            "hosts",
            "add",
            "x",
            "--url",
            "quay.io",
            "--username",
            "u",
            "--access-token-file",
            str(tmp_path / "token"),
        ),
    ]
    for run in runs:
        lines = error_lines(run)
        assert lines[0] == (
            f"error: UNAVAILABLE: cannot reach the broker at {address} (is `credbroker serve` "
            "running there? choose the address with --server or CREDBROKER_SERVER)"
        )
        assert all(line.startswith("  ") for line in lines[1:])
        assert run.stdout == ""
    cli.assert_no_secret_printed()


def test_an_unreadable_token_file_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    run = cli.fails(
        "hosts",
        "add",
        "x",
        "--url",
        "quay.io",
        "--username",
        "u",
        "--access-token-file",
        str(missing),
    )
    assert re.fullmatch(
        rf"error: cannot read the access token file {re.escape(str(missing))}: .+\n", run.stderr
    )
    cli.fails("hosts", "show", "x")
