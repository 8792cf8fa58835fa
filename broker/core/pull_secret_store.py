"""What the broker remembers about the pull secrets it provisioned.

The broker's store, not the cluster, is the truth about which image hosts a
pull secret carries: a secret's annotations are only informational, since
anyone who may edit a Secret in a namespace could otherwise add another
host's name there and have the reconciler write that host's credentials in.

Store layout (keys of the SecretStore, next to `hosts/...`; one folder each,
since Vault lists one folder at a time). Nothing here is a secret:

- `pullsecret-records/{namespace}_{secret_name}`: one per provisioned secret
  (`_` occurs in neither name): the image host ids it carries, the service
  accounts that reference it, whether it is kept in sync, or `revoked`
  (a tombstone: the reconciler must not provision it again; an explicit
  ProvisionPullSecret overrides it);
- `pullsecret-bindings/{id}`: a kept-in-sync label selector: new namespaces
  that match it are provisioned by the reconciler. The id is a hash of
  (secret name, normalised selector), so one provision per selector and name
  replaces the previous one, and replicas writing the same binding meet on
  one key;
- `pullsecret-installation`: a random id, written on every secret as an
  annotation: another credbroker installation (another store) sharing the
  cluster never touches this installation's secrets, nor this one theirs.

Every write is compare-and-set; a lost race is retried a few times from a
fresh read.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from broker.core.errors import Aborted
from broker.core.store_access import call_store
from broker.stores.base import (
    Delete,
    Entry,
    Invalidating,
    Put,
    SecretStore,
    VersionConflict,
)

RECORDS_PREFIX = "pullsecret-records/"
BINDINGS_PREFIX = "pullsecret-bindings/"
INSTALLATION_KEY = "pullsecret-installation"
_CAS_RETRIES = 5

_T = TypeVar("_T")


@dataclass(frozen=True)
class Record:
    namespace: str
    secret_name: str
    image_hosts: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    keep_in_sync: bool = False
    revoked: bool = False
    version: int = 0

    @property
    def key(self) -> str:
        return record_key(self.namespace, self.secret_name)

    @property
    def active(self) -> bool:
        return not self.revoked


@dataclass(frozen=True)
class Binding:
    secret_name: str
    namespace_selector: str
    image_hosts: tuple[str, ...]
    service_accounts: tuple[str, ...]
    version: int = 0

    @property
    def id(self) -> str:
        return binding_id(self.secret_name, self.namespace_selector)

    @property
    def key(self) -> str:
        return BINDINGS_PREFIX + self.id


def record_key(namespace: str, secret_name: str) -> str:
    return f"{RECORDS_PREFIX}{namespace}_{secret_name}"


def binding_id(secret_name: str, namespace_selector: str) -> str:
    digest = hashlib.sha256(f"{secret_name}\n{namespace_selector}".encode()).hexdigest()
    return digest[:24]


class PullSecretRegistry:
    """Records, bindings and the installation id in the broker's store."""

    def __init__(
        self,
        store: SecretStore,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._store = store
        self._clock = clock

    # -- installation ----------------------------------------------------------

    def installation_id(self, *, create: bool) -> str:
        """This installation's id; "" when there is none yet and `create` is False."""
        for _ in range(_CAS_RETRIES):
            entry = call_store(self._store.get, INSTALLATION_KEY)
            if entry is not None:
                return str(entry.data.get("id", ""))
            if not create:
                return ""
            new_id = secrets.token_hex(8)
            try:
                self._commit([Put(INSTALLATION_KEY, {"id": new_id}, 0)])
            except Aborted:
                self._forget([INSTALLATION_KEY])
                continue  # another replica wrote it first: use theirs
            return new_id
        raise _conflict(INSTALLATION_KEY)

    # -- records ---------------------------------------------------------------

    def record(self, namespace: str, secret_name: str) -> Record | None:
        entry = call_store(self._store.get, record_key(namespace, secret_name))
        return None if entry is None else _record_from(entry)

    def records(self) -> list[Record]:
        """Every record (tombstones included), in (namespace, name) order."""
        found = [_record_from(e) for e in call_store(self._store.list, RECORDS_PREFIX)]
        return sorted(found, key=lambda r: (r.namespace, r.secret_name))

    def update_record(
        self,
        namespace: str,
        secret_name: str,
        change: Callable[[Record | None], Record | None],
    ) -> Record | None:
        """Read, apply `change` (None: delete), write with compare-and-set; retry a lost
        race from a fresh read. `change` may raise to refuse."""
        key = record_key(namespace, secret_name)
        for attempt in range(_CAS_RETRIES):
            if attempt:
                self._forget([key])
            current = self.record(namespace, secret_name)
            wanted = change(current)
            if wanted == current or (wanted is None and current is None):
                return current
            expected = current.version if current else 0
            try:
                if wanted is None:
                    self._commit([Delete(key, expected)])
                    return None
                versions = self._commit([Put(key, _record_data(wanted, self._clock()), expected)])
            except Aborted:
                continue
            return replace(wanted, version=versions[key])
        raise _conflict(key)

    def create_record(self, record: Record) -> Record | None:
        """Write a new record; None when one appeared meanwhile (another replica)."""
        try:
            versions = self._commit([Put(record.key, _record_data(record, self._clock()), 0)])
        except Aborted:
            self._forget([record.key])
            return None
        return replace(record, version=versions[record.key])

    # -- bindings --------------------------------------------------------------

    def bindings(self) -> list[Binding]:
        return [_binding_from(e) for e in call_store(self._store.list, BINDINGS_PREFIX)]

    def put_binding(self, binding: Binding) -> Binding:
        """Create or replace the binding of (secret name, selector)."""
        for attempt in range(_CAS_RETRIES):
            if attempt:
                self._forget([binding.key])
            current = call_store(self._store.get, binding.key)
            data = _binding_data(binding, self._clock())
            if current is not None and _same_binding(current.data, data):
                return replace(binding, version=current.version)
            try:
                versions = self._commit([Put(binding.key, data, current.version if current else 0)])
            except Aborted:
                continue
            return replace(binding, version=versions[binding.key])
        raise _conflict(binding.key)

    def delete_binding(self, binding: Binding) -> bool:
        """Delete a binding; False when it is gone already."""
        for attempt in range(_CAS_RETRIES):
            if attempt:
                self._forget([binding.key])
            current = call_store(self._store.get, binding.key)
            if current is None:
                return False
            try:
                self._commit([Delete(binding.key, current.version)])
            except Aborted:
                continue
            return True
        raise _conflict(binding.key)

    # -- helpers ---------------------------------------------------------------

    def _forget(self, keys: Sequence[str]) -> None:
        if isinstance(self._store, Invalidating):
            self._store.invalidate(keys)

    def _commit(self, ops: Sequence[Put | Delete]) -> dict[str, int]:
        try:
            return dict(call_store(self._store.commit, ops).versions)
        except VersionConflict as exc:
            raise _conflict(exc.key) from None


def _conflict(key: str) -> Aborted:
    return Aborted(
        "pull-secret bookkeeping was changed concurrently; try again",
        reason="CONCURRENT_MODIFICATION",
        metadata={"key": key},
    )


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _record_from(entry: Entry) -> Record:
    data = entry.data
    return Record(
        namespace=str(data.get("namespace", "")),
        secret_name=str(data.get("secret_name", "")),
        image_hosts=_strings(data.get("image_hosts")),
        service_accounts=_strings(data.get("service_accounts")),
        keep_in_sync=bool(data.get("keep_in_sync", False)),
        revoked=bool(data.get("revoked", False)),
        version=entry.version,
    )


def _record_data(record: Record, now: dt.datetime) -> dict[str, Any]:
    return {
        "namespace": record.namespace,
        "secret_name": record.secret_name,
        "image_hosts": list(record.image_hosts),
        "service_accounts": list(record.service_accounts),
        "keep_in_sync": record.keep_in_sync,
        "revoked": record.revoked,
        "update_time": now.isoformat(),
    }


def _binding_from(entry: Entry) -> Binding:
    data = entry.data
    return Binding(
        secret_name=str(data.get("secret_name", "")),
        namespace_selector=str(data.get("namespace_selector", "")),
        image_hosts=_strings(data.get("image_hosts")),
        service_accounts=_strings(data.get("service_accounts")),
        version=entry.version,
    )


def _binding_data(binding: Binding, now: dt.datetime) -> dict[str, Any]:
    return {
        "secret_name": binding.secret_name,
        "namespace_selector": binding.namespace_selector,
        "image_hosts": list(binding.image_hosts),
        "service_accounts": list(binding.service_accounts),
        "update_time": now.isoformat(),
    }


def _same_binding(stored: Any, wanted: dict[str, Any]) -> bool:
    return all(stored.get(k) == v for k, v in wanted.items() if k != "update_time")
