"""The image host catalog on an in-memory store: races the network tests cannot time."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from broker.core.audit import Actor, AuditEvent
from broker.core.errors import Aborted, AlreadyExists, FailedPrecondition
from broker.core.image_hosts import HostFields, ImageHostCatalog, _claim_key
from broker.core.registry_url import parse_registry_url
from broker.core.secrets import Secret
from broker.stores.base import CommitResult, Operation, Put
from broker.stores.memory import MemoryStore

ACTOR = Actor(principal="alice", peer="ipv4:127.0.0.1:1")
TOKEN = "tok-unit-Wq93"


class InterferingStore(MemoryStore):
    """Runs `interference` once, just before the next commit: another writer's move."""

    def __init__(self) -> None:
        super().__init__()
        self.interference: Callable[[], None] | None = None

    def commit(self, operations: Sequence[Operation]) -> CommitResult:
        move, self.interference = self.interference, None
        if move is not None:
            move()
        return super().commit(operations)


@pytest.fixture
def store() -> InterferingStore:
    return InterferingStore()


@pytest.fixture
def events() -> list[AuditEvent]:
    return []


@pytest.fixture
def catalog(store: InterferingStore, events: list[AuditEvent]) -> ImageHostCatalog:
    catalog = ImageHostCatalog(store, events.append)
    assert catalog.ensure_seeded()
    return catalog


def test_seeding_twice_is_a_no_op(catalog: ImageHostCatalog) -> None:
    assert not catalog.ensure_seeded()
    assert [h.id for h in catalog.all_hosts()] == ["docker-hub"]


def test_delete_loses_to_a_concurrent_set_default(
    catalog: ImageHostCatalog, store: InterferingStore
) -> None:
    catalog.create("a", HostFields(url="a.example.com"), ACTOR)
    other = ImageHostCatalog(store, lambda event: None)
    store.interference = lambda: other.set_default("a", "moved meanwhile", "", ACTOR)
    with pytest.raises(FailedPrecondition):
        catalog.delete("a", "", ACTOR)
    assert catalog.get_default().id == "a"


def test_set_default_loses_to_a_concurrent_delete(
    catalog: ImageHostCatalog, store: InterferingStore
) -> None:
    host = catalog.create("a", HostFields(url="a.example.com"), ACTOR)
    other = ImageHostCatalog(store, lambda event: None)
    store.interference = lambda: other.delete("a", "", ACTOR)
    with pytest.raises(Aborted):
        catalog.set_default("a", "too late", host.etag, ACTOR)
    assert catalog.get_default().id == "docker-hub"


def test_unconditional_update_retries_a_lost_race(
    catalog: ImageHostCatalog, store: InterferingStore
) -> None:
    catalog.create("a", HostFields(url="a.example.com"), ACTOR)
    other = ImageHostCatalog(store, lambda event: None)
    store.interference = lambda: other.update(
        "a", HostFields(username="u"), ["username"], "", ACTOR
    )
    updated = catalog.update("a", HostFields(display_name="A"), ["display_name"], "", ACTOR)
    assert (updated.display_name, updated.username) == ("A", "u")


def test_create_racing_for_a_registry_is_already_exists(
    catalog: ImageHostCatalog, store: InterferingStore
) -> None:
    other = ImageHostCatalog(store, lambda event: None)
    store.interference = lambda: other.create("first", HostFields(url="r.example.com"), ACTOR)
    with pytest.raises(AlreadyExists):
        catalog.create("second", HostFields(url="r.example.com"), ACTOR)
    assert [h.id for h in catalog.all_hosts()] == ["docker-hub", "first"]


def test_orphaned_claim_is_taken_over(catalog: ImageHostCatalog, store: InterferingStore) -> None:
    # A claim whose host is gone (left by an interrupted non-atomic store).
    claim = _claim_key(parse_registry_url("r.example.com"))
    store.commit([Put(claim, {"image_host_id": "vanished"}, 0)])
    host = catalog.create("new", HostFields(url="r.example.com"), ACTOR)
    assert host.location.registry == "r.example.com"
    entry = store.get(claim)
    assert entry is not None
    assert entry.data["image_host_id"] == "new"


def test_changes_are_audited_with_actor_and_without_secret(
    catalog: ImageHostCatalog, events: list[AuditEvent]
) -> None:
    events.clear()
    catalog.create(
        "a", HostFields(url="a.example.com", username="u", access_token=Secret(TOKEN)), ACTOR
    )
    catalog.set_default("a", "because", "", ACTOR)
    catalog.update("a", HostFields(access_token=Secret(TOKEN + "2")), ["access_token"], "", ACTOR)
    catalog.set_default("docker-hub", "back", "", ACTOR)
    catalog.delete("a", "", ACTOR)
    assert [e.action for e in events] == [
        "CreateImageHost",
        "SetDefaultImageHost",
        "UpdateImageHost",
        "SetDefaultImageHost",
        "DeleteImageHost",
    ]
    assert all(e.actor == ACTOR for e in events)
    assert events[1].details["reason"] == "because"
    assert events[3].details["previous_default"] == "imageHosts/a"
    assert TOKEN not in repr(events)


def test_secret_and_host_reprs_hide_the_token(catalog: ImageHostCatalog) -> None:
    host = catalog.create(
        "a", HostFields(url="a.example.com", username="u", access_token=Secret(TOKEN)), ACTOR
    )
    assert host.access_token.reveal() == TOKEN
    assert TOKEN not in repr(host)
    assert TOKEN not in str(host.access_token)
    assert TOKEN not in f"{host.access_token}"
