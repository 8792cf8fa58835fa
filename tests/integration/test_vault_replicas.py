"""Two broker replicas on one Vault: DESIGN.md, Scale ("stateless apart from its cache").

Both replicas are real `credbroker serve` processes on the same Vault KV v2
prefix, each with its own data directory (principals, admin token) and a short
read-through cache (`--cache-ttl 0.5`). The tests race them against each other
through the public gRPC API and then read Vault directly (VaultStore) to check
what really landed:

- every write is compare-and-set: of many concurrent updates carrying one etag
  exactly one wins and the others are ABORTED; unconditional updates of
  different fields from both replicas all land (a client retries an ABORTED
  CONCURRENT_MODIFICATION, as the error tells it to), one KV version each;
- there is exactly one default at every moment while both replicas move it;
- concurrent creates of one registry leave exactly one host holding it, and a
  URL change that loses a race leaves every registry with one host;
- two replicas seeding an empty store at once create exactly one Docker Hub;
- a change made through one replica shows through the other within the cache TTL.

Runs against the session `vault` fixture: the emulator, or a real Vault when
VAULT_ADDR is set. Only the tests that need fault injection (to pin a race
deterministically) skip on a real Vault. Access tokens are random and are only
ever compared as booleans, so a failure never prints one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf import field_mask_pb2

from broker.core.image_hosts import CLAIMS_PREFIX, DEFAULT_KEY, HOSTS_PREFIX, SEED_ID
from broker.stores.vault import VaultStore
from broker.v1 import image_hosts_pb2 as pb
from tests.support.broker_process import BrokerProcess
from tests.support.status import details_of
from tests.support.vault_target import VaultTarget

pytestmark = pytest.mark.integration

CACHE_TTL = 0.5
# A change shows on the other replica once its cached copy is older than the TTL
# and one refresh (a few Vault round trips) has run.
SEEN_WITHIN = CACHE_TTL + 1.0
# How long polls wait for what must eventually show (generous: not a measurement).
VISIBLE_WITHIN = CACHE_TTL + 2.5
CALL_TIMEOUT = 20.0
BARRIER_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
CLIENT_RETRIES = 10
SEEDED_LOG = "seeded Docker Hub"

_T = TypeVar("_T")


# -- replicas --------------------------------------------------------------------


class Replicas:
    """Two brokers on one Vault prefix, plus direct access to that prefix."""

    def __init__(self, vault: VaultTarget, prefix: str, token: str, brokers: list[BrokerProcess]):
        self.vault = vault
        self.prefix = prefix
        self._token = token
        self.brokers = brokers
        # Values that must never show in a replica's log (checked when they stop).
        self.secrets: list[str] = [token]

    def secret_token(self) -> str:
        value = f"tok-{secrets.token_urlsafe(18)}"
        self.secrets.append(value)
        return value

    def check_logs(self) -> None:
        __tracebackhide__ = True
        for index, broker in enumerate(self.brokers):
            text = broker.text()
            leaked = [i for i, value in enumerate(self.secrets) if value in text]
            # Say which secret (by index) leaked and where, never its value.
            assert leaked == [], f"secret(s) #{leaked} appear in the log of replica {index}"

    @property
    def a(self) -> BrokerProcess:
        return self.brokers[0]

    @property
    def b(self) -> BrokerProcess:
        return self.brokers[1]

    @contextlib.contextmanager
    def direct(self) -> Iterator[VaultStore]:
        """Vault itself under the replicas' prefix, bypassing every cache."""
        store = self.vault.store(self.prefix, self._token)
        try:
            yield store
        finally:
            store.close()


def _start_all(brokers: list[BrokerProcess]) -> None:
    """Start every broker at the same time (they race for the seeding)."""
    with concurrent.futures.ThreadPoolExecutor(len(brokers)) as pool:
        futures = [pool.submit(b.start) for b in brokers]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        for broker, error in zip(brokers, errors, strict=True):
            if error is None:
                broker.stop()
        raise failed[0]


@contextlib.contextmanager
def running_replicas(
    vault: VaultTarget, tmp_path: Path, *, before_start: Callable[[str], None] | None = None
) -> Iterator[Replicas]:
    prefix = vault.new_prefix()
    token = vault.token_for_prefix(prefix)
    brokers = [
        BrokerProcess(
            tmp_path / f"replica-{index}",
            args=[
                *("--store", "vault", "--vault-mount", vault.mount, "--vault-prefix", prefix),
                *("--cache-ttl", str(CACHE_TTL)),
            ],
            env={"VAULT_ADDR": vault.url, "VAULT_TOKEN": token},
        )
        for index in range(2)
    ]
    if before_start is not None:
        before_start(prefix)
    _start_all(brokers)
    pair = Replicas(vault, prefix, token, brokers)
    try:
        yield pair
    except BaseException:
        for broker in brokers:
            broker.stop()
        raise
    codes = [broker.stop() for broker in brokers]
    assert codes == [0, 0], "a replica did not stop cleanly"
    pair.check_logs()


@pytest.fixture
def replicas(vault: VaultTarget, tmp_path: Path) -> Iterator[Replicas]:
    with running_replicas(vault, tmp_path) as pair:
        yield pair


# -- calls -----------------------------------------------------------------------


def create(
    broker: BrokerProcess,
    image_host_id: str,
    url: str,
    *,
    username: str = "",
    token: str = "",
    display_name: str = "",
) -> pb.ImageHost:
    return broker.image_hosts().CreateImageHost(
        pb.CreateImageHostRequest(
            image_host_id=image_host_id,
            image_host=pb.ImageHost(
                url=url, username=username, access_token=token, display_name=display_name
            ),
        ),
        timeout=CALL_TIMEOUT,
    )


def update(
    broker: BrokerProcess, name: str, paths: list[str], *, etag: str = "", **fields: str
) -> pb.ImageHost:
    return broker.image_hosts().UpdateImageHost(
        pb.UpdateImageHostRequest(
            image_host=pb.ImageHost(name=name, etag=etag, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        ),
        timeout=CALL_TIMEOUT,
    )


def get(broker: BrokerProcess, name: str) -> pb.ImageHost:
    return broker.image_hosts().GetImageHost(
        pb.GetImageHostRequest(name=name), timeout=CALL_TIMEOUT
    )


def set_default(broker: BrokerProcess, name: str, reason: str) -> pb.ImageHost:
    return broker.image_hosts().SetDefaultImageHost(
        pb.SetDefaultImageHostRequest(name=name, reason=reason), timeout=CALL_TIMEOUT
    )


def list_hosts(broker: BrokerProcess) -> list[pb.ImageHost]:
    response = broker.image_hosts().ListImageHosts(
        pb.ListImageHostsRequest(page_size=1000), timeout=CALL_TIMEOUT
    )
    assert not response.next_page_token
    return list(response.image_hosts)


Outcome = tuple[str, pb.ImageHost | None]


def outcome(call: Callable[[], pb.ImageHost]) -> Outcome:
    """("OK", answer) or (status code name, None); never raises for a gRPC error."""
    try:
        return "OK", call()
    except grpc.RpcError as error:
        return details_of(error).code.name, None


def retried(call: Callable[[], pb.ImageHost], stats: list[int]) -> str:
    """An unconditional write as a client makes it: ABORTED with CONCURRENT_MODIFICATION
    ("read it again and retry") is retried, a bounded number of times. `stats` counts
    the retries (the broker gave up after its own retries under contention)."""
    for _ in range(CLIENT_RETRIES):
        try:
            call()
        except grpc.RpcError as error:
            details = details_of(error)
            if details.code.name != "ABORTED" or details.reason != "CONCURRENT_MODIFICATION":
                return details.code.name
            stats.append(1)
            continue
        return "OK"
    return "ABORTED"


def all_at_once(calls: list[Callable[[], _T]]) -> list[_T]:
    """Run every call in its own thread, released together by a barrier."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], _T]) -> _T:
        barrier.wait(BARRIER_TIMEOUT)
        return call()

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll `condition` (bounded); the seconds it took to hold."""
    start = time.monotonic()
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(POLL_INTERVAL)
    if condition():
        return time.monotonic() - start
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def settle() -> None:
    """Let every cached copy of both replicas age past the TTL."""
    time.sleep(CACHE_TTL + 0.1)


def defaults_of(hosts: list[pb.ImageHost]) -> list[str]:
    return [h.name for h in hosts if h.default]


# -- a change through one replica is visible through the other ---------------------


def test_a_change_through_one_replica_shows_through_the_other_within_the_ttl(
    replicas: Replicas,
) -> None:
    a, b = replicas.a, replicas.b
    name = "imageHosts/quay"
    # B caches "absent" for the host, and A's list before A's create.
    assert outcome(lambda: get(b, name))[0] == "NOT_FOUND"
    assert [h.name for h in list_hosts(b)] == [f"imageHosts/{SEED_ID}"]

    created = create(a, "quay", "quay.io", display_name="Quay")
    took = [
        wait_for(
            lambda: outcome(lambda: get(b, name))[0] == "OK", "B to see A's new host", SEEN_WITHIN
        ),
        wait_for(lambda: name in [h.name for h in list_hosts(b)], "B's list", SEEN_WITHIN),
    ]
    seen = get(b, name)
    assert (seen.display_name, seen.registry, seen.etag) == ("Quay", "quay.io", created.etag)

    # An update through B shows through A (which has it cached) within the TTL.
    assert get(a, name).display_name == "Quay"
    changed = update(b, name, ["display_name"], display_name="Quay mirror", etag=seen.etag)
    took.append(wait_for(lambda: get(a, name).etag == changed.etag, "A to see it", SEEN_WITHIN))
    assert get(a, name).display_name == "Quay mirror"

    # A new default through A shows through B.
    set_default(a, name, "replica test")
    took.append(wait_for(lambda: defaults_of(list_hosts(b)) == [name], "B to see it", SEEN_WITHIN))
    assert max(took) <= SEEN_WITHIN, took

    # A fresh etag from the other replica is never refused as stale: the replica
    # that has an older copy cached reads Vault again before answering.
    fresh = update(a, name, ["display_name"], display_name="Quay 3", etag=changed.etag)
    again = update(b, name, ["display_name"], display_name="Quay 4", etag=fresh.etag)
    assert again.display_name == "Quay 4"


# -- no lost update --------------------------------------------------------------------


def test_concurrent_updates_with_one_etag_from_both_replicas_have_exactly_one_winner(
    replicas: Replicas,
) -> None:
    a, b = replicas.a, replicas.b
    host = create(a, "race", "race.example.org", display_name="start")
    name = host.name
    wait_for(lambda: outcome(lambda: get(b, name))[0] == "OK", "B to see the host", VISIBLE_WITHIN)
    etag = host.etag
    per_replica = 4

    def rename(broker: BrokerProcess, label: str, etag: str) -> Callable[[], Outcome]:
        return lambda: outcome(
            lambda: update(broker, name, ["display_name"], display_name=label, etag=etag)
        )

    for round_number in range(4):
        calls = [
            rename(broker, f"r{round_number}-{label}{writer}", etag)
            for broker, label in ((a, "a"), (b, "b"))
            for writer in range(per_replica)
        ]
        results = all_at_once(calls)
        codes = sorted(code for code, _ in results)
        winners = [answer for code, answer in results if code == "OK" and answer is not None]
        assert len(winners) == 1, f"round {round_number}: outcomes {codes}"
        assert codes.count("ABORTED") == 2 * per_replica - 1, f"round {round_number}: {codes}"
        etag = winners[0].etag
        # What Vault holds is the winner's write, at the version its etag names.
        with replicas.direct() as vault:
            stored = vault.get(HOSTS_PREFIX + "race")
        assert stored is not None
        assert stored.data["display_name"] == winners[0].display_name
        assert etag.startswith(f"{stored.version}-")
        for broker in (a, b):
            wait_for(
                lambda broker=broker, etag=etag: get(broker, name).etag == etag,
                "both replicas to serve the winner",
                VISIBLE_WITHIN,
            )


def test_unconditional_updates_of_different_fields_from_both_replicas_all_land(
    replicas: Replicas,
) -> None:
    a, b = replicas.a, replicas.b
    first_token = replicas.secret_token()
    host = create(a, "shared", "shared.example.org", username="robot", token=first_token)
    name = host.name
    wait_for(lambda: outcome(lambda: get(b, name))[0] == "OK", "B to see the host", VISIBLE_WITHIN)
    rounds = 8
    tokens = [replicas.secret_token() for _ in range(rounds)]

    retries: list[int] = []

    def rename_through_a() -> list[str]:
        return [
            retried(
                lambda i=i: update(a, name, ["display_name"], display_name=f"name-{i}"), retries
            )
            for i in range(rounds)
        ]

    def rotate_through_b() -> list[str]:
        return [
            retried(
                lambda token=token: update(b, name, ["access_token"], access_token=token), retries
            )
            for token in tokens
        ]

    renames, rotations = all_at_once([rename_through_a, rotate_through_b])
    assert renames == ["OK"] * rounds, f"after {len(retries)} client retries"
    assert rotations == ["OK"] * rounds, f"after {len(retries)} client retries"

    with replicas.direct() as vault:
        stored = vault.get(HOSTS_PREFIX + "shared")
    assert stored is not None
    # Every write is a compare-and-set on the previous version: one version per update.
    assert stored.version == 1 + 2 * rounds
    assert stored.data["display_name"] == f"name-{rounds - 1}"
    assert stored.data["username"] == "robot"
    token_kept = stored.data["access_token"] == tokens[-1]
    assert token_kept, "the last rotated access token is not the stored one"
    settle()
    for broker in (a, b):
        seen = wait_for_value(broker, name, lambda h: h.display_name == f"name-{rounds - 1}")
        assert seen.access_token_set
        assert seen.username == "robot"


def wait_for_value(
    broker: BrokerProcess, name: str, condition: Callable[[pb.ImageHost], bool]
) -> pb.ImageHost:
    found: list[pb.ImageHost] = []

    def check() -> bool:
        found[:] = [get(broker, name)]
        return condition(found[0])

    wait_for(check, f"{name} to reach the expected state", VISIBLE_WITHIN)
    return found[0]


# -- exactly one default ------------------------------------------------------------


def test_exactly_one_default_while_both_replicas_move_it(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    ids = ["d-a1", "d-a2", "d-b1", "d-b2"]
    for image_host_id in ids:
        create(a, image_host_id, f"{image_host_id}.example.org")
    names = [f"imageHosts/{i}" for i in ids]
    wait_for(
        lambda: {n for n in names} <= {h.name for h in list_hosts(b)},
        "B to list every host",
        VISIBLE_WITHIN,
    )
    moves = 6
    done = threading.Event()
    violations: list[str] = []
    observed = 0

    def watch() -> None:
        nonlocal observed
        for _ in range(10_000):  # bounded; ends when both movers are done
            for label, broker in (("A", a), ("B", b)):
                defaults = defaults_of(list_hosts(broker))
                observed += 1
                if len(defaults) != 1:
                    violations.append(f"{label} listed defaults {defaults}")
            if done.is_set():
                return

    retries: list[int] = []

    def move(broker: BrokerProcess, targets: list[str]) -> list[str]:
        return [
            retried(lambda i=i: set_default(broker, targets[i % 2], f"move {i}"), retries)
            for i in range(moves)
        ]

    with concurrent.futures.ThreadPoolExecutor(1) as watcher:
        watching = watcher.submit(watch)
        try:
            moved_a, moved_b = all_at_once([lambda: move(a, names[:2]), lambda: move(b, names[2:])])
        finally:
            done.set()
        watching.result(timeout=60)
    assert moved_a == ["OK"] * moves, f"after {len(retries)} client retries"
    assert moved_b == ["OK"] * moves, f"after {len(retries)} client retries"
    assert violations == []
    assert observed >= 2

    with replicas.direct() as vault:
        pointer = vault.get(DEFAULT_KEY)
    assert pointer is not None
    # One pointer version per move (and the seeding): none lost, none extra.
    assert pointer.version == 1 + 2 * moves
    expected = f"imageHosts/{pointer.data['image_host_id']}"
    assert expected in names
    settle()
    for broker in (a, b):
        wait_for(
            lambda broker=broker: defaults_of(list_hosts(broker)) == [expected],
            "both replicas to agree on the default Vault holds",
            VISIBLE_WITHIN,
        )
        default = broker.image_hosts().GetDefaultImageHost(
            pb.GetDefaultImageHostRequest(), timeout=CALL_TIMEOUT
        )
        assert default.name == expected


def kv_write(vault: VaultTarget, prefix: str, key: str) -> str:
    """The URL path of the KV write of one key (for fault injection)."""
    return rf"^/v1/{re.escape(vault.mount)}/data/{re.escape(prefix)}/{re.escape(key)}$"


def test_a_delete_racing_a_set_default_never_leaves_the_default_on_a_missing_host(
    vault: VaultTarget, tmp_path: Path
) -> None:
    """B makes a host the default; the emulator holds B's pointer write while A
    deletes that host. One of them must fail: afterwards there is exactly one
    default, and it exists."""
    if vault.emulator is None:
        pytest.skip("needs the emulator's fault injection to hold a set-default mid-way")
    emulator = vault.emulator
    with running_replicas(vault, tmp_path) as pair:
        host = create(pair.a, "short-lived", "short.example.org")
        wait_for(
            lambda: outcome(lambda: get(pair.b, host.name))[0] == "OK",
            "B to see the host",
            VISIBLE_WITHIN,
        )
        fault = emulator.inject(
            path_regex=kv_write(vault, pair.prefix, DEFAULT_KEY), method="POST", delay=1.5, count=1
        )
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                setting = pool.submit(outcome, lambda: set_default(pair.b, host.name, "race"))
                wait_for(lambda: fault.hits == 1, "B's pointer write to be held", 10)
                try:
                    pair.a.image_hosts().DeleteImageHost(
                        pb.DeleteImageHostRequest(name=host.name), timeout=CALL_TIMEOUT
                    )
                    deleted = "OK"
                except grpc.RpcError as error:
                    deleted = details_of(error).code.name
                made_default = setting.result(timeout=30)[0]
        finally:
            emulator.clear_faults()
        assert "OK" in (deleted, made_default)
        assert (deleted, made_default) != ("OK", "OK"), "both the delete and the set-default won"
        settle()
        with pair.direct() as direct:
            pointer = direct.get(DEFAULT_KEY)
            assert pointer is not None
            assert direct.get(HOSTS_PREFIX + str(pointer.data["image_host_id"])) is not None
        for broker in pair.brokers:
            wait_for(
                lambda broker=broker: len(defaults_of(list_hosts(broker))) == 1,
                "exactly one default on both replicas",
                VISIBLE_WITHIN,
            )


# -- one registry, one host ----------------------------------------------------------


def claims_by_owner(vault: VaultStore) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for entry in vault.list(CLAIMS_PREFIX):
        owners.setdefault(str(entry.data["image_host_id"]), []).append(entry.key)
    return owners


def check_one_host_per_registry(replicas: Replicas) -> dict[str, str]:
    """Vault and both replicas agree that every registry has exactly one host, and
    every host holds the claim of its registry. Returns registry -> host id."""
    settle()
    with replicas.direct() as vault:
        stored = {e.key[len(HOSTS_PREFIX) :]: e for e in vault.list(HOSTS_PREFIX)}
        owners = claims_by_owner(vault)
    holders: dict[str, list[str]] = {}
    for image_host_id, entry in stored.items():
        holders.setdefault(str(entry.data["url"]), []).append(image_host_id)
    shared = {registry: ids for registry, ids in holders.items() if len(ids) > 1}
    assert shared == {}, f"registries held by more than one host in Vault: {shared}"
    unclaimed = sorted(i for i in stored if len(owners.get(i, [])) != 1)
    assert unclaimed == [], f"hosts that do not hold exactly one registry claim: {unclaimed}"
    for broker in (replicas.a, replicas.b):
        wait_for(
            lambda broker=broker: (
                {h.name.split("/", 1)[1] for h in list_hosts(broker)} == set(stored)
            ),
            "both replicas to list what Vault holds",
            VISIBLE_WITHIN,
        )
        listed: dict[str, list[str]] = {}
        for host in list_hosts(broker):
            listed.setdefault(host.registry, []).append(host.name)
        assert all(len(names) == 1 for names in listed.values()), listed
    return {registry: ids[0] for registry, ids in holders.items()}


def test_concurrent_creates_of_one_registry_on_both_replicas_leave_one_holder(
    replicas: Replicas,
) -> None:
    a, b = replicas.a, replicas.b
    rounds = 20
    for index in range(rounds):
        registry = f"reg{index}.example.org:5000"
        # Two creates through each replica, released together.
        calls = [
            lambda broker=broker, host_id=f"{label}{index}", registry=registry: outcome(
                lambda: create(broker, host_id, registry)
            )
            for broker, label in ((a, "a"), (b, "b"), (a, "c"), (b, "d"))
        ]
        codes = sorted(code for code, _ in all_at_once(calls))
        assert codes.count("OK") == 1, f"{registry}: outcomes {codes}"
        assert set(codes) - {"OK"} <= {"ALREADY_EXISTS", "ABORTED"}, codes
    held = check_one_host_per_registry(replicas)
    assert len([r for r in held if r.startswith("reg")]) == rounds


def host_write(vault: VaultTarget, prefix: str, image_host_id: str) -> str:
    """The URL path of a KV write of one host (for fault injection)."""
    return kv_write(vault, prefix, HOSTS_PREFIX + image_host_id)


def test_the_claim_of_a_create_in_progress_is_not_taken_over(
    vault: VaultTarget, tmp_path: Path
) -> None:
    """The emulator holds A's host write; meanwhile B creates a host for the same
    registry. B must get ALREADY_EXISTS (or ABORTED), not take over A's claim."""
    if vault.emulator is None:
        pytest.skip("needs the emulator's fault injection to hold a create mid-way")
    emulator = vault.emulator
    with running_replicas(vault, tmp_path) as pair:
        registry = "slow.example.org"
        fault = emulator.inject(
            path_regex=host_write(vault, pair.prefix, "slow-a"), method="POST", delay=1.5, count=1
        )
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                first = pool.submit(outcome, lambda: create(pair.a, "slow-a", registry))
                wait_for(lambda: fault.hits == 1, "A's host write to be held", 10)
                second = outcome(lambda: create(pair.b, "slow-b", registry))
                codes = [first.result(timeout=30)[0], second[0]]
        finally:
            emulator.clear_faults()
        assert codes[0] == "OK"
        assert codes[1] in ("ALREADY_EXISTS", "ABORTED"), codes
        assert check_one_host_per_registry(pair)[registry] == "slow-a"


def test_a_url_change_that_loses_a_race_leaves_every_registry_with_one_holder(
    vault: VaultTarget, tmp_path: Path
) -> None:
    """A moves a host to a new URL; the emulator holds A's host write while, through
    B, the host is renamed (so A's write loses) and a new host is created on the
    old URL. A must be ABORTED, and every registry must keep exactly one host."""
    if vault.emulator is None:
        pytest.skip("needs the emulator's fault injection to hold an update mid-way")
    emulator = vault.emulator
    with running_replicas(vault, tmp_path) as pair:
        mover = create(pair.a, "mover", "old.example.org")
        wait_for(
            lambda: outcome(lambda: get(pair.b, mover.name))[0] == "OK",
            "B to see the host",
            VISIBLE_WITHIN,
        )
        fault = emulator.inject(
            path_regex=host_write(vault, pair.prefix, "mover"), method="POST", delay=1.5, count=1
        )
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                moving = pool.submit(
                    outcome,
                    lambda: update(
                        pair.a, mover.name, ["url"], url="new.example.org", etag=mover.etag
                    ),
                )
                wait_for(lambda: fault.hits == 1, "A's host write to be held", 10)
                renamed = outcome(
                    lambda: update(
                        pair.b, mover.name, ["display_name"], display_name="x", etag=mover.etag
                    )
                )
                newcomer = outcome(lambda: create(pair.b, "newcomer", "old.example.org"))
                moved = moving.result(timeout=30)
        finally:
            emulator.clear_faults()
        assert renamed[0] == "OK"
        assert moved[0] == "ABORTED"
        assert newcomer[0] in ("OK", "ALREADY_EXISTS"), newcomer[0]
        held = check_one_host_per_registry(pair)
        assert "new.example.org" not in held


# -- seeding ----------------------------------------------------------------------------


def test_two_replicas_seeding_an_empty_store_at_once_create_one_docker_hub(
    vault: VaultTarget, tmp_path: Path
) -> None:
    emulator = vault.emulator

    def hold_writes(prefix: str) -> None:
        # On the emulator, hold each write a moment so that both replicas have
        # looked at the empty store before either has written to it.
        if emulator is not None:
            path = rf"^/v1/{re.escape(vault.mount)}/data/{re.escape(prefix)}/"
            emulator.inject(path_regex=path, method="POST", delay=0.5)

    try:
        with running_replicas(vault, tmp_path, before_start=hold_writes) as pair:
            if emulator is not None:
                emulator.clear_faults()
            seeded = [broker.text().count(SEEDED_LOG) for broker in pair.brokers]
            assert sorted(seeded) == [0, 1], f"seeded logs per replica: {seeded}"
            with pair.direct() as direct:
                hosts = direct.list(HOSTS_PREFIX)
                pointer = direct.get(DEFAULT_KEY)
                owners = claims_by_owner(direct)
            assert [(e.key, e.version) for e in hosts] == [(HOSTS_PREFIX + SEED_ID, 1)]
            assert hosts[0].data["display_name"] == "Docker Hub"
            assert pointer is not None
            assert pointer.version == 1
            assert pointer.data["image_host_id"] == SEED_ID
            assert list(owners) == [SEED_ID]
            assert len(owners[SEED_ID]) == 1
            if emulator is not None:
                # Exactly one seeding write of the host got through; a second
                # replica that tried too was refused by check-and-set (400).
                seed_path = f"/v1/{vault.mount}/data/{pair.prefix}/{HOSTS_PREFIX}{SEED_ID}"
                statuses = sorted(
                    r.status or 0
                    for r in emulator.requests
                    if r.method in ("POST", "PUT") and r.path == seed_path
                )
                assert statuses in ([200], [200, 400]), statuses
            for broker in pair.brokers:
                listed = list_hosts(broker)
                assert [(h.name, h.default, h.registry) for h in listed] == [
                    (f"imageHosts/{SEED_ID}", True, "docker.io")
                ]
    finally:
        if emulator is not None:
            emulator.clear_faults()
