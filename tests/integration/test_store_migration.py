"""`credbroker store migrate` between the embedded file store and Vault, for real.

The source is a data directory written by a real broker on the file store
(hosts with and without access tokens, a path-scoped host, a plain-HTTP host,
an updated host, a deleted host, a default that is not the seeded one). Each
test copies it, runs the installed console script as an operator would, and
then reads the stores directly (FileStore, VaultStore) to compare every entry:
ids, display names, URLs, usernames, access tokens, create/update times, the
registry claims and the default pointer.

Access tokens and the Vault token are registered as secrets: every output of
every command is checked for them, stored values are only ever compared as a
whole (a failure names the differing keys, never a value), and failure
messages redact them.

Runs against the session `vault` fixture: the emulator, or a real Vault when
VAULT_ADDR is set. Interruptions by injected faults (503, a dropped connection)
need the emulator and skip on a real Vault; the kill -9 interruption runs on both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sysconfig
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from broker.core.image_hosts import CLAIMS_PREFIX, DEFAULT_KEY, HOSTS_PREFIX, SEED_ID
from broker.stores.base import Entry, Put, SecretStore
from broker.stores.file import DATA_FILE, FileStore
from broker.stores.vault import VaultStore
from broker.v1 import image_hosts_pb2 as pb
from tests.support.broker_process import BrokerProcess
from tests.support.vault_target import VaultTarget

pytestmark = pytest.mark.integration

CREDBROKER = Path(sysconfig.get_path("scripts")) / "credbroker"
RUN_TIMEOUT = 60.0
CALL_TIMEOUT = 20.0
REDACTED = "[REDACTED]"
SUMMARY = re.compile(
    r"^migrated (\d+) entries \((\d+) already present, (\d+) overwritten\); verified (\d+)$"
)
# Fields a broker answers with that must survive a migration (etag excluded: it
# is the store's version, which a new store numbers afresh).
SERVED_FIELDS = (
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
)


# -- secrets and commands ----------------------------------------------------------


class Secrets:
    """Values that must never be printed; failure messages redact them."""

    def __init__(self) -> None:
        self.values: list[str] = []

    def new(self, label: str) -> str:
        value = f"{label}-{secrets.token_urlsafe(18)}"
        self.values.append(value)
        return value

    def add(self, value: str) -> str:
        if value:
            self.values.append(value)
        return value

    def redact(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, REDACTED)
        return text

    def assert_absent(self, text: str, where: str) -> None:
        __tracebackhide__ = True
        leaked = [i for i, value in enumerate(self.values) if value in text]
        if leaked:
            raise AssertionError(f"secret(s) #{leaked} appear in {where}")


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def summary(self) -> tuple[int, int, int, int]:
        """(copied, already present, overwritten, verified) from the last stdout line."""
        match = SUMMARY.match(self.stdout.strip().splitlines()[-1] if self.stdout.strip() else "")
        assert match, f"no migration summary in stdout: {self.stdout!r}"
        copied, present, overwritten, verified = (int(g) for g in match.groups())
        return copied, present, overwritten, verified


@dataclass
class Migrator:
    """Runs `credbroker store migrate` against one Vault prefix."""

    vault: VaultTarget
    prefix: str
    token: str
    secrets: Secrets

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CREDBROKER_")}
        # The Vault token only ever travels in the environment, never on a command line.
        return {**base, "VAULT_ADDR": self.vault.url, "VAULT_TOKEN": self.token}

    def command(self, source: str, target: str, data_dir: Path, *extra: str) -> list[str]:
        return [
            str(CREDBROKER),
            "store",
            "migrate",
            "--from",
            source,
            "--to",
            target,
            "--data-dir",
            str(data_dir),
            "--vault-mount",
            self.vault.mount,
            "--vault-prefix",
            self.prefix,
            *extra,
        ]

    def __call__(self, source: str, target: str, data_dir: Path, *extra: str) -> Run:
        args = self.command(source, target, data_dir, *extra)
        completed = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=RUN_TIMEOUT,
            check=False,
        )
        run = Run(tuple(args[1:]), completed.returncode, completed.stdout, completed.stderr)
        self.check_quiet(run.stdout, run.stderr)
        return run

    def check_quiet(self, *outputs: str) -> None:
        __tracebackhide__ = True
        for output in outputs:
            self.secrets.assert_absent(output, "the output of credbroker store migrate")

    def ok(self, source: str, target: str, data_dir: Path, *extra: str) -> Run:
        run = self(source, target, data_dir, *extra)
        if run.returncode != 0:
            pytest.fail(
                f"credbroker {' '.join(run.args)} exited with {run.returncode}\n"
                f"stdout:\n{self.secrets.redact(run.stdout)}\n"
                f"stderr:\n{self.secrets.redact(run.stderr)}"
            )
        assert run.stderr == ""
        return run

    def fails(self, source: str, target: str, data_dir: Path, *extra: str) -> Run:
        run = self(source, target, data_dir, *extra)
        if run.returncode != 1:
            pytest.fail(
                f"credbroker {' '.join(run.args)} exited with {run.returncode}, expected 1\n"
                f"stdout:\n{self.secrets.redact(run.stdout)}\n"
                f"stderr:\n{self.secrets.redact(run.stderr)}"
            )
        assert "Traceback" not in run.stderr
        assert run.stderr.startswith("error: "), self.secrets.redact(run.stderr)
        return run

    @contextlib.contextmanager
    def store(self) -> Iterator[VaultStore]:
        store = self.vault.store(self.prefix, self.token)
        try:
            yield store
        finally:
            store.close()


@pytest.fixture
def migrator(vault: VaultTarget, source: Source) -> Migrator:
    prefix = vault.new_prefix()
    token = vault.token_for_prefix(prefix)
    found = Secrets()
    found.values = [*source.secrets.values, token]
    return Migrator(vault, prefix, token, found)


# -- store contents -------------------------------------------------------------------


def snapshot(store: SecretStore) -> dict[str, Entry]:
    return {entry.key: entry for entry in store.list("")}


def file_snapshot(directory: Path) -> dict[str, Entry]:
    store = FileStore(directory)
    try:
        return snapshot(store)
    finally:
        store.close()


def differing_keys(left: Mapping[str, Entry], right: Mapping[str, Entry]) -> list[str]:
    """Keys whose data differ (or that only one side has): names only, never values."""
    return sorted(
        key
        for key in set(left) | set(right)
        if key not in left or key not in right or left[key].data != right[key].data
    )


def versions(entries: Mapping[str, Entry]) -> dict[str, int]:
    return {key: entry.version for key, entry in entries.items()}


def migration_order(keys: list[str]) -> list[str]:
    """The order `credbroker store migrate` writes keys in: hosts, claims, the default."""
    rank = {HOSTS_PREFIX: 0, CLAIMS_PREFIX: 1}
    return sorted(keys, key=lambda k: (2 if k == DEFAULT_KEY else rank[k[: k.index("/") + 1]], k))


def file_fingerprint(directory: Path) -> tuple[str, int]:
    path = directory / DATA_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


# -- the source: a data directory written by a real broker on the file store ---------


@dataclass
class Source:
    directory: Path
    served: list[dict[str, Any]]  # ListImageHosts, SERVED_FIELDS only
    secrets: Secrets
    tokens: dict[str, str] = field(default_factory=dict)  # host id -> access token

    def copy_to(self, directory: Path) -> Path:
        shutil.copytree(self.directory, directory)
        return directory


def served_hosts(broker: BrokerProcess) -> list[dict[str, Any]]:
    response = broker.image_hosts().ListImageHosts(
        pb.ListImageHostsRequest(page_size=1000), timeout=CALL_TIMEOUT
    )
    assert not response.next_page_token
    return [{name: getattr(host, name) for name in SERVED_FIELDS} for host in response.image_hosts]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    directory = tmp_path_factory.mktemp("migration-source") / "data"
    found = Secrets()
    tokens = {
        "ghcr": found.new("ghcr"),
        "local": found.new("local"),
        "private": found.new("private-old"),
    }
    broker = BrokerProcess(directory).start()
    try:
        hosts = broker.image_hosts()

        def create(image_host_id: str, url: str, username: str = "", name: str = "") -> None:
            hosts.CreateImageHost(
                pb.CreateImageHostRequest(
                    image_host_id=image_host_id,
                    image_host=pb.ImageHost(
                        url=url,
                        username=username,
                        access_token=tokens.get(image_host_id, ""),
                        display_name=name,
                    ),
                ),
                timeout=CALL_TIMEOUT,
            )

        create("ghcr", "https://ghcr.io/acme", "acme-bot", "GitHub (acme)")
        create("local", "http://127.0.0.1:5000", "ci", "Local registry")
        create("quay", "quay.io")
        create("private", "registry.example.org:5000", "deploy", "Private")
        create("gone", "gone.example.org")
        hosts.DeleteImageHost(pb.DeleteImageHostRequest(name="imageHosts/gone"))
        # An updated host: a new version, a new token, update_time after create_time.
        tokens["private"] = found.new("private-new")
        hosts.UpdateImageHost(
            pb.UpdateImageHostRequest(
                image_host=pb.ImageHost(
                    name="imageHosts/private",
                    display_name="Private registry",
                    access_token=tokens["private"],
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name", "access_token"]),
            ),
            timeout=CALL_TIMEOUT,
        )
        hosts.SetDefaultImageHost(
            pb.SetDefaultImageHostRequest(name="imageHosts/private", reason="migration test"),
            timeout=CALL_TIMEOUT,
        )
        served = served_hosts(broker)
    finally:
        assert broker.stop() == 0
    found.assert_absent(broker.text(), "the source broker's log")
    names = [h["name"] for h in served]
    assert names == [f"imageHosts/{i}" for i in ("docker-hub", "ghcr", "local", "private", "quay")]
    return Source(directory, served, found, tokens)


# -- round trips -----------------------------------------------------------------------


def test_file_to_vault_to_file_round_trips_every_field(
    source: Source, migrator: Migrator, tmp_path: Path
) -> None:
    origin = source.copy_to(tmp_path / "origin")
    before = file_snapshot(origin)
    fingerprint = file_fingerprint(origin)
    total = len(before)
    # Hosts, one claim per host, and the default pointer.
    assert sum(k.startswith(HOSTS_PREFIX) for k in before) == 5
    assert sum(k.startswith(CLAIMS_PREFIX) for k in before) == 5
    assert DEFAULT_KEY in before

    run = migrator.ok("file", "vault", origin)
    assert run.summary() == (total, 0, 0, total)
    with migrator.store() as vault:
        in_vault = snapshot(vault)
    assert differing_keys(before, in_vault) == []
    # Every field by name, tokens included (compared, never shown).
    for image_host_id, token in source.tokens.items():
        data = in_vault[HOSTS_PREFIX + image_host_id].data
        assert data["access_token"] == token, f"the access token of {image_host_id} differs"
    private = in_vault[HOSTS_PREFIX + "private"].data
    assert (private["display_name"], private["url"], private["username"]) == (
        "Private registry",
        "registry.example.org:5000",
        "deploy",
    )
    assert private["update_time"] > private["create_time"]
    assert in_vault[HOSTS_PREFIX + "quay"].data["access_token"] == ""
    assert in_vault[DEFAULT_KEY].data["image_host_id"] == "private"
    assert in_vault[DEFAULT_KEY].data["reason"] == "migration test"
    assert HOSTS_PREFIX + "gone" not in in_vault
    # The source was only read.
    assert file_fingerprint(origin) == fingerprint

    back = tmp_path / "back"
    run = migrator.ok("vault", "file", back)
    assert run.summary() == (total, 0, 0, total)
    returned = file_snapshot(back)
    assert differing_keys(before, returned) == []
    assert (back / "store.key").stat().st_mode & 0o077 == 0
    with migrator.store() as vault:
        assert versions(snapshot(vault)) == versions(in_vault), "the Vault source was written"

    # Running either migration again changes nothing: everything is already present.
    again = migrator.ok("file", "vault", origin)
    assert again.summary() == (0, total, 0, total)
    assert "already present" in again.stdout
    with migrator.store() as vault:
        assert versions(snapshot(vault)) == versions(in_vault)
    again = migrator.ok("vault", "file", back)
    assert again.summary() == (0, total, 0, total)
    assert versions(file_snapshot(back)) == versions(returned)
    assert file_fingerprint(origin) == fingerprint


def test_a_broker_on_the_migrated_store_serves_the_same_hosts(
    source: Source, migrator: Migrator, tmp_path: Path
) -> None:
    origin = source.copy_to(tmp_path / "origin")
    migrator.ok("file", "vault", origin)
    back = tmp_path / "back"
    migrator.ok("vault", "file", back)

    on_vault = BrokerProcess(
        tmp_path / "vault-broker",
        args=[
            *("--store", "vault", "--vault-mount", migrator.vault.mount),
            *("--vault-prefix", migrator.prefix),
        ],
        env={"VAULT_ADDR": migrator.vault.url, "VAULT_TOKEN": migrator.token},
    )
    on_file = BrokerProcess(back)
    for broker in (on_vault, on_file):
        broker.start()
        try:
            served = served_hosts(broker)
            default = broker.image_hosts().GetDefaultImageHost(
                pb.GetDefaultImageHostRequest(), timeout=CALL_TIMEOUT
            )
        finally:
            code = broker.stop()
        # Every served field but the etag (the new store numbers versions afresh).
        assert served == source.served
        assert default.name == "imageHosts/private"
        assert code == 0
        log = broker.text()
        migrator.check_quiet(log)
        # Nothing was seeded on top of the migrated hosts.
        assert "seeded Docker Hub" not in log


# -- interruptions ----------------------------------------------------------------------


def kv_write(migrator: Migrator, key: str) -> str:
    """The URL path of the KV write of one key (for fault injection)."""
    mount, prefix = migrator.vault.mount, migrator.prefix
    return rf"^/v1/{re.escape(mount)}/data/{re.escape(prefix)}/{re.escape(key)}$"


@pytest.mark.parametrize("interruption", ["http-503", "dropped-connection", "kill-9"])
def test_an_interrupted_migration_loses_nothing_and_a_rerun_completes(
    source: Source, migrator: Migrator, tmp_path: Path, interruption: str
) -> None:
    emulator = migrator.vault.emulator
    if emulator is None and interruption != "kill-9":
        pytest.skip("needs the emulator's fault injection")
    origin = source.copy_to(tmp_path / "origin")
    before = file_snapshot(origin)
    fingerprint = file_fingerprint(origin)
    order = migration_order(list(before))
    total = len(order)
    nth = 6  # the 7th write: past the hosts, among the claims
    assert order[nth].startswith(CLAIMS_PREFIX)

    if interruption == "kill-9":
        written = kill_mid_migration(migrator, origin, order[nth])
    else:
        assert emulator is not None
        fault = emulator.inject(
            path_regex=kv_write(migrator, order[nth]),
            method="POST",
            count=1,
            **({"status": 503} if interruption == "http-503" else {"drop": True}),
        )
        try:
            failed = migrator.fails("file", "vault", origin)
        finally:
            emulator.clear_faults()
        assert fault.hits == 1
        assert failed.stdout == ""
        expected = "sealed or down" if interruption == "http-503" else "cannot reach Vault"
        assert expected in failed.stderr, migrator.secrets.redact(failed.stderr)
        written = nth

    # Nothing lost: the source is untouched; the target holds a prefix of the
    # migration order, each entry exactly as in the source, and nothing else.
    assert file_fingerprint(origin) == fingerprint
    assert differing_keys(before, file_snapshot(origin)) == []
    with migrator.store() as vault:
        partial = snapshot(vault)
    if written is not None:
        assert sorted(partial) == sorted(order[:written])
    assert all(partial[k].data == before[k].data for k in partial), "a partial entry differs"

    rerun = migrator.ok("file", "vault", origin)
    copied, present, overwritten, verified = rerun.summary()
    assert (present, overwritten, verified) == (len(partial), 0, total)
    assert copied == total - len(partial)
    with migrator.store() as vault:
        complete = snapshot(vault)
    assert differing_keys(before, complete) == []
    # What the interrupted run wrote was kept as it was, not written again.
    assert {k: complete[k].version for k in partial} == versions(partial)
    assert file_fingerprint(origin) == fingerprint


def kill_mid_migration(migrator: Migrator, origin: Path, held_key: str) -> int | None:
    """kill -9 the migration; on the emulator while the write of `held_key` is held.

    Returns how many entries (in migration order) the target holds afterwards, when
    that is known (on the emulator), else None.
    """
    emulator = migrator.vault.emulator
    fault = None
    if emulator is not None:
        fault = emulator.inject(
            path_regex=kv_write(migrator, held_key), method="POST", delay=1.0, count=1
        )
    process = subprocess.Popen(
        migrator.command("file", "vault", origin),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=migrator.env(),
    )
    try:
        if fault is not None:
            deadline = time.monotonic() + RUN_TIMEOUT
            while fault.hits == 0 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert fault.hits == 1, "the migration never reached the held write"
        else:
            # A real Vault: kill as soon as the target holds anything (bounded).
            with migrator.store() as vault:
                deadline = time.monotonic() + RUN_TIMEOUT
                while not vault.list("") and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=RUN_TIMEOUT)
        if emulator is not None:
            emulator.clear_faults()
    migrator.check_quiet(stdout, stderr)
    if emulator is None:
        return None
    assert process.returncode == -signal.SIGKILL
    # The held write still lands after the migration died (its answer was lost).
    landed = f"{migrator.prefix}/{held_key}"
    deadline = time.monotonic() + 10
    while emulator.kv_get(landed, mount=migrator.vault.mount) is None:
        assert time.monotonic() < deadline, "the held write never landed"
        time.sleep(0.02)
    order = migration_order(list(file_snapshot(origin)))
    return order.index(held_key) + 1


# -- conflicts --------------------------------------------------------------------------


def test_a_target_holding_different_content_stops_the_migration_unless_overwrite(
    source: Source, migrator: Migrator, tmp_path: Path
) -> None:
    origin = source.copy_to(tmp_path / "origin")
    before = file_snapshot(origin)
    total = len(before)
    migrator.ok("file", "vault", origin)

    # Someone changed two entries in Vault since: a host and the default pointer.
    with migrator.store() as vault:
        host = vault.get(HOSTS_PREFIX + "ghcr")
        pointer = vault.get(DEFAULT_KEY)
        assert host is not None
        assert pointer is not None
        vault.commit(
            [
                Put(host.key, {**host.data, "display_name": "changed in Vault"}, host.version),
                Put(pointer.key, {**pointer.data, "image_host_id": SEED_ID}, pointer.version),
            ]
        )
        tampered = snapshot(vault)

    failed = migrator.fails("file", "vault", origin)
    assert failed.stdout == ""
    assert failed.stderr == (
        "error: the target already holds 'hosts/ghcr' with different content; "
        "nothing was overwritten (use --overwrite to replace it)\n"
    )
    with migrator.store() as vault:
        after = snapshot(vault)
    # Nothing was written at all: same keys, same versions, same content.
    assert versions(after) == versions(tampered)
    assert differing_keys(after, tampered) == []
    assert after[HOSTS_PREFIX + "ghcr"].data["display_name"] == "changed in Vault"

    # A file target holding different content is refused the same way, untouched.
    file_target = source.copy_to(tmp_path / "file-target")
    fingerprint = file_fingerprint(file_target)
    refused = migrator.fails("vault", "file", file_target)
    assert refused.stderr.startswith("error: the target already holds 'hosts/ghcr' ")
    assert file_fingerprint(file_target) == fingerprint

    replaced = migrator.ok("file", "vault", origin, "--overwrite")
    assert replaced.summary() == (0, total - 2, 2, total)
    with migrator.store() as vault:
        final = snapshot(vault)
    assert differing_keys(before, final) == []
    assert final[DEFAULT_KEY].data["image_host_id"] == "private"
    assert versions(final) == {
        **versions(tampered),
        HOSTS_PREFIX + "ghcr": tampered[HOSTS_PREFIX + "ghcr"].version + 1,
        DEFAULT_KEY: tampered[DEFAULT_KEY].version + 1,
    }


def test_a_target_a_broker_already_seeded_is_refused_until_overwrite(
    source: Source, migrator: Migrator, tmp_path: Path
) -> None:
    """The README's warning: a broker started on the empty Vault prefix first seeds
    its own Docker Hub, which differs from the source's (another create time)."""
    origin = source.copy_to(tmp_path / "origin")
    before = file_snapshot(origin)
    early = BrokerProcess(
        tmp_path / "early-broker",
        args=[
            *("--store", "vault", "--vault-mount", migrator.vault.mount),
            *("--vault-prefix", migrator.prefix),
        ],
        env={"VAULT_ADDR": migrator.vault.url, "VAULT_TOKEN": migrator.token},
    ).start()
    try:
        # It seeded Docker Hub (and, answering, it is fully started: stopping a broker
        # right after "listening on" can beat its SIGTERM handler).
        names = [h["name"] for h in served_hosts(early)]
    finally:
        code = early.stop()
    assert names == [f"imageHosts/{SEED_ID}"]
    assert code == 0
    migrator.check_quiet(early.text())
    with migrator.store() as vault:
        seeded = snapshot(vault)
    assert HOSTS_PREFIX + SEED_ID in seeded

    failed = migrator.fails("file", "vault", origin)
    assert failed.stderr.startswith(f"error: the target already holds 'hosts/{SEED_ID}' ")
    with migrator.store() as vault:
        assert versions(snapshot(vault)) == versions(seeded)

    replaced = migrator.ok("file", "vault", origin, "--overwrite")
    copied, present, overwritten, verified = replaced.summary()
    assert overwritten >= 2  # the seeded host and the default pointer
    assert copied + present + overwritten == verified == len(before)
    with migrator.store() as vault:
        assert differing_keys(before, snapshot(vault)) == []


def test_a_missing_file_source_is_refused_and_not_created(
    migrator: Migrator, tmp_path: Path
) -> None:
    """A mistyped --data-dir (or the default one, when `make run` used ./.data) must not
    look like a successful migration of nothing, nor write a store where none was."""
    missing = tmp_path / "no-such-data-dir"
    run = migrator("file", "vault", missing)
    created = missing.exists()
    assert (run.returncode, created) == (1, False), (
        f"exit {run.returncode}, stdout {run.stdout!r}, created the directory: {created}"
    )
    assert str(missing) in run.stderr
    with migrator.store() as vault:
        assert snapshot(vault) == {}
