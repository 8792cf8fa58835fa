"""Image hosts: registries and the accounts the broker uses on them.

Store layout (keys of the SecretStore):
- `hosts/{id}`: one image host, secret included;
- `claims/{base32(registry[/prefix])}`: `{"image_host_id": id}`, making
  (registry, repository prefix) unique across hosts;
- `default`: `{"image_host_id": id, ...}`, the default host pointer.
Every change is one compare-and-set batch, so two writers never both win.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from broker.core.audit import SYSTEM_ACTOR, Actor, AuditEvent, AuditSink
from broker.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.core.registry_url import (
    DOCKER_HUB_SERVER_ADDRESS,
    InvalidRegistryUrl,
    RegistryLocation,
    parse_registry_url,
)
from broker.core.secrets import EMPTY_SECRET, Secret
from broker.core.store_access import call_store, decode_page_token, encode_page_token
from broker.stores.base import (
    Check,
    Delete,
    Entry,
    Invalidating,
    Operation,
    Put,
    SecretStore,
    VersionConflict,
)

HOSTS_PREFIX = "hosts/"
CLAIMS_PREFIX = "claims/"
DEFAULT_KEY = "default"
RESOURCE_PREFIX = "imageHosts/"

ID_RE = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_DISPLAY_NAME = 100
MAX_USERNAME = 256
MAX_ACCESS_TOKEN = 8192
MAX_REASON = 512
MAX_PAGE_TOKEN = 256
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Retries of a write without an etag that lost a race with another writer.
_UNCONDITIONAL_RETRIES = 5
# A claim whose host does not exist is taken over only once it is this old: on a
# store without atomic batches (Vault) it is also what a create in progress looks
# like between its claim write and its host write.
CLAIM_TAKEOVER_AFTER = dt.timedelta(seconds=60)

SEED_ID = "docker-hub"
SEED_DISPLAY_NAME = "Docker Hub"

MUTABLE_FIELDS = ("display_name", "url", "username", "access_token")


@dataclass(frozen=True)
class ImageHost:
    id: str
    display_name: str
    url: str
    location: RegistryLocation
    username: str
    access_token: Secret = field(repr=False)
    create_time: dt.datetime
    update_time: dt.datetime
    version: int
    is_default: bool = False

    @property
    def name(self) -> str:
        return RESOURCE_PREFIX + self.id

    @property
    def etag(self) -> str:
        # The version alone could repeat in another store; the creation time
        # ties the etag to this very object.
        digest = hashlib.sha256(f"{self.id}|{self.create_time.isoformat()}".encode()).hexdigest()
        return f"{self.version}-{digest[:12]}"

    @property
    def server_address(self) -> str:
        """The key Docker uses for this registry (config.json, credential helpers)."""
        if self.location.is_docker_hub:
            return DOCKER_HUB_SERVER_ADDRESS
        return self.location.registry


@dataclass(frozen=True)
class HostFields:
    """Values a caller sets on an image host; None means "not given"."""

    display_name: str | None = None
    url: str | None = None
    username: str | None = None
    access_token: Secret | None = None


@dataclass(frozen=True)
class Page:
    hosts: list[ImageHost]
    next_page_token: str


def resource_name_to_id(name: str, field_name: str = "name") -> str:
    if not name:
        raise InvalidArgument.single(field_name, "is required")
    if not name.startswith(RESOURCE_PREFIX):
        raise InvalidArgument.single(
            field_name, "must be a resource name of the form imageHosts/{image_host_id}"
        )
    image_host_id = name[len(RESOURCE_PREFIX) :]
    _check_id(image_host_id, field_name)
    return image_host_id


def _check_id(image_host_id: str, field_name: str) -> None:
    if not ID_RE.fullmatch(image_host_id):
        raise InvalidArgument.single(
            field_name,
            "image host id must be 1-63 characters of lowercase letters, digits and '-', "
            "start with a letter and not end with '-'",
        )


def _text_violation(value: str, limit: int, *, allow_space: bool) -> str | None:
    if len(value) > limit:
        return f"must be at most {limit} characters"
    if any(not ch.isprintable() for ch in value):
        return "must not contain control characters"
    if not allow_space and any(ch.isspace() for ch in value):
        return "must not contain whitespace"
    if value != value.strip():
        return "must not start or end with whitespace"
    return None


class ImageHostCatalog:
    """The domain service behind ImageHostService."""

    def __init__(
        self,
        store: SecretStore,
        audit: AuditSink,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self._observers: list[Callable[[str], None]] = []

    def add_observer(self, callback: Callable[[str], None]) -> None:
        """Call `callback(image_host_id)` after every successful change of a host
        (create, update, delete, set default). It runs on the writer's thread and
        must return quickly and not raise (the pull-secret reconciler's trigger)."""
        self._observers.append(callback)

    # -- queries -------------------------------------------------------------

    def get(self, image_host_id: str, actor: Actor) -> ImageHost:
        _check_scope(actor, image_host_id)
        entry = call_store(self._store.get, HOSTS_PREFIX + image_host_id)
        if entry is None:
            raise NotFound(
                f"{RESOURCE_PREFIX}{image_host_id} not found", reason="IMAGE_HOST_NOT_FOUND"
            )
        return _host_from_entry(entry, self._default_id())

    def list_page(self, page_size: int, page_token: str, actor: Actor) -> Page:
        if page_size < 0:
            raise InvalidArgument.single("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token)
        default_id = self._default_id()
        entries = [
            e
            for e in call_store(self._store.list, HOSTS_PREFIX)
            if e.key[len(HOSTS_PREFIX) :] > after and actor.may_use_host(e.key[len(HOSTS_PREFIX) :])
        ]
        page = [_host_from_entry(e, default_id) for e in entries[:size]]
        token = encode_page_token(page[-1].id) if len(entries) > size else ""
        return Page(hosts=page, next_page_token=token)

    def all_hosts(self) -> list[ImageHost]:
        default_id = self._default_id()
        return [_host_from_entry(e, default_id) for e in call_store(self._store.list, HOSTS_PREFIX)]

    def get_default(self, actor: Actor = SYSTEM_ACTOR) -> ImageHost:
        default_id = self._default_id()
        if default_id is None:
            raise FailedPrecondition("no default image host is set", reason="NO_DEFAULT_IMAGE_HOST")
        _check_scope(actor, default_id)
        entry = call_store(self._store.get, HOSTS_PREFIX + default_id)
        if entry is None:
            raise FailedPrecondition(
                f"the default image host {RESOURCE_PREFIX}{default_id} no longer exists; "
                "set another default",
                reason="NO_DEFAULT_IMAGE_HOST",
            )
        return _host_from_entry(entry, default_id)

    # -- changes -------------------------------------------------------------

    def create(self, image_host_id: str, fields: HostFields, actor: Actor) -> ImageHost:
        _check_scope(actor, image_host_id)
        _check_id(image_host_id, "image_host_id")
        url = fields.url or ""
        location = _parse_url(url)
        username = fields.username or ""
        token = fields.access_token or EMPTY_SECRET
        display_name = fields.display_name or image_host_id
        _validate_fields(display_name, username, token)

        key = HOSTS_PREFIX + image_host_id
        now = self._clock()
        data = _host_data(display_name, url, username, token, now, now)

        def attempt() -> ImageHost:
            if call_store(self._store.get, key) is not None:
                raise AlreadyExists(
                    f"{RESOURCE_PREFIX}{image_host_id} already exists",
                    reason="IMAGE_HOST_ALREADY_EXISTS",
                )
            # The registry claim first: with a store that applies a batch in order,
            # a lost claim then stops the batch before the host is written.
            ops = self._claim_ops(location, image_host_id, release=None, actor=actor)
            ops.append(Put(key, data, 0))
            default = call_store(self._store.get, DEFAULT_KEY)
            becomes_default = default is None
            if becomes_default:
                ops.append(
                    Put(
                        DEFAULT_KEY, _default_data(image_host_id, "first image host", actor, now), 0
                    )
                )
            versions = self._commit(ops)
            return _host_from_data(image_host_id, data, versions[key], becomes_default)

        host = _retry_unconditional(attempt)
        self._record("CreateImageHost", actor, host, {"registry": location.claim})
        return host

    def update(
        self,
        image_host_id: str,
        fields: HostFields,
        mask: Sequence[str],
        etag: str,
        actor: Actor,
    ) -> ImageHost:
        _check_scope(actor, image_host_id)
        unknown = [p for p in mask if p not in MUTABLE_FIELDS]
        if unknown:
            raise InvalidArgument.single(
                "update_mask",
                f"cannot update {_shown(unknown)}; updatable fields are "
                + ", ".join(MUTABLE_FIELDS),
            )
        if not mask:
            raise InvalidArgument.single("update_mask", "names no field to update")

        def attempt() -> ImageHost:
            current = self._current(image_host_id, etag, actor)
            _check_etag(current, etag)
            url = (fields.url or "") if "url" in mask else current.url
            location = _parse_url(url) if "url" in mask else current.location
            username = (fields.username or "") if "username" in mask else current.username
            display_name = (
                (fields.display_name or image_host_id)
                if "display_name" in mask
                else current.display_name
            )
            if "access_token" in mask:
                token = fields.access_token or EMPTY_SECRET
            elif location.claim != current.location.claim or username != current.username:
                # The stored secret belonged to the old account.
                token = EMPTY_SECRET
            else:
                token = current.access_token
            _validate_fields(display_name, username, token)

            key = HOSTS_PREFIX + image_host_id
            data = _host_data(
                display_name, url, username, token, current.create_time, self._clock()
            )
            ops: list[Operation] = []
            released: list[Operation] = []
            if location.claim != current.location.claim:
                claim_ops = self._claim_ops(
                    location, image_host_id, release=current.location, actor=actor
                )
                ops += [op for op in claim_ops if not isinstance(op, Delete)]
                released = [op for op in claim_ops if isinstance(op, Delete)]
            ops.append(Put(key, data, current.version))
            # The old registry is freed only once the host has moved: with a store that
            # applies a batch in order, a lost race then never frees a registry in use.
            ops += released
            versions = self._commit(ops)
            return _host_from_data(image_host_id, data, versions[key], current.is_default)

        host = _retry_unconditional(attempt, etag)
        self._record("UpdateImageHost", actor, host, {"update_mask": ",".join(sorted(mask))})
        return host

    def delete(self, image_host_id: str, etag: str, actor: Actor) -> None:
        def attempt() -> ImageHost:
            current = self._current(image_host_id, etag, actor)
            _check_etag(current, etag)
            default = call_store(self._store.get, DEFAULT_KEY)
            if default is not None and default.data.get("image_host_id") == image_host_id:
                raise FailedPrecondition(
                    f"{current.name} is the default image host; "
                    "make another host the default first",
                    reason="DEFAULT_IMAGE_HOST_UNDELETABLE",
                    metadata={"image_host": current.name},
                )
            ops: list[Operation] = [
                Delete(HOSTS_PREFIX + image_host_id, current.version),
                # The default must not move onto this host while it is deleted; checked
                # before the claim is freed, so that a lost race frees nothing.
                Check(DEFAULT_KEY, default.version if default else 0),
            ]
            claim = call_store(self._store.get, _claim_key(current.location))
            if claim is not None and claim.data.get("image_host_id") == image_host_id:
                ops.append(Delete(claim.key, claim.version))
            self._commit(ops)
            return current

        host = _retry_unconditional(attempt, etag)
        self._record("DeleteImageHost", actor, host, {})

    def set_default(self, image_host_id: str, reason: str, etag: str, actor: Actor) -> ImageHost:
        _check_scope(actor, image_host_id)
        if not reason.strip():
            raise InvalidArgument.single("reason", "is required: say why the default changes")
        problem = _text_violation(reason, MAX_REASON, allow_space=True)
        if problem:
            raise InvalidArgument.single("reason", problem)

        def attempt() -> tuple[ImageHost, str]:
            host = self._current(image_host_id, etag, actor)
            _check_etag(host, etag)
            default = call_store(self._store.get, DEFAULT_KEY)
            previous = str(default.data.get("image_host_id", "")) if default else ""
            self._commit(
                [
                    Put(
                        DEFAULT_KEY,
                        _default_data(image_host_id, reason, actor, self._clock()),
                        default.version if default else 0,
                    ),
                    # The host must still exist, unchanged, once it is the default. Checked
                    # after the write: a delete racing it (host write, then default check)
                    # is seen by one side or the other, and that side is undone.
                    Check(HOSTS_PREFIX + image_host_id, host.version),
                ]
            )
            return replace(host, is_default=True), previous

        host, previous = _retry_unconditional(attempt, etag)
        self._record(
            "SetDefaultImageHost",
            actor,
            host,
            {"reason": reason, "previous_default": RESOURCE_PREFIX + previous if previous else ""},
        )
        return host

    def ensure_seeded(self) -> bool:
        """On an empty store, create anonymous Docker Hub as the default host."""
        if call_store(self._store.list, HOSTS_PREFIX):
            return False
        if call_store(self._store.get, DEFAULT_KEY) is not None:
            return False
        now = self._clock()
        location = parse_registry_url(DOCKER_HUB_SERVER_ADDRESS)
        data = _host_data(SEED_DISPLAY_NAME, DOCKER_HUB_SERVER_ADDRESS, "", EMPTY_SECRET, now, now)
        try:
            versions = self._commit(
                [
                    Put(HOSTS_PREFIX + SEED_ID, data, 0),
                    Put(_claim_key(location), {"image_host_id": SEED_ID}, 0),
                    Put(
                        DEFAULT_KEY,
                        _default_data(SEED_ID, "seeded on first start", SYSTEM_ACTOR, now),
                        0,
                    ),
                ]
            )
        except Aborted:
            return False  # another process seeded first
        host = _host_from_data(SEED_ID, data, versions[HOSTS_PREFIX + SEED_ID], True)
        self._record("SetDefaultImageHost", SYSTEM_ACTOR, host, {"reason": "seeded on first start"})
        return True

    # -- helpers -------------------------------------------------------------

    def _current(self, image_host_id: str, etag: str, actor: Actor) -> ImageHost:
        """The host a write starts from. A caller's etag can be newer than what a
        cached store holds (it read through another replica): on a mismatch, forget
        the cached copy and read once more before answering ETAG_MISMATCH."""
        host = self.get(image_host_id, actor)
        if etag and etag != host.etag and isinstance(self._store, Invalidating):
            self._store.invalidate([HOSTS_PREFIX + image_host_id])
            host = self.get(image_host_id, actor)
        return host

    def _fresh_get(self, key: str) -> Entry | None:
        """`key` as the store holds it now, not a cached copy."""
        if isinstance(self._store, Invalidating):
            self._store.invalidate([key])
        return call_store(self._store.get, key)

    def _default_id(self) -> str | None:
        entry = call_store(self._store.get, DEFAULT_KEY)
        return None if entry is None else str(entry.data.get("image_host_id") or "") or None

    def _claim_ops(
        self,
        location: RegistryLocation,
        image_host_id: str,
        release: RegistryLocation | None,
        actor: Actor = SYSTEM_ACTOR,
    ) -> list[Operation]:
        ops: list[Operation] = []
        claim = call_store(self._store.get, _claim_key(location))
        owner = None if claim is None else str(claim.data.get("image_host_id", ""))
        now = self._clock()
        # The owner's host is read from the store itself: a cached "absent" may be stale.
        owner_exists = (
            claim is not None
            and owner != image_host_id
            and self._fresh_get(HOSTS_PREFIX + str(owner)) is not None
        )
        if (
            claim is not None
            and owner != image_host_id
            and not owner_exists
            and not _claim_abandoned(claim, now)
        ):
            # A create in progress elsewhere (its host is not written yet).
            raise Aborted(
                f"registry {location.claim} is being claimed by another image host "
                "right now; read again and retry",
                reason="CONCURRENT_MODIFICATION",
                metadata={"key": claim.key},
            )
        if owner_exists:
            if not actor.may_use_host(str(owner)):
                # Do not name a host outside the caller's scope.
                raise AlreadyExists(
                    f"registry {location.claim} is already served by another image host",
                    reason="REGISTRY_ALREADY_CLAIMED",
                    metadata={"registry": location.claim},
                )
            raise AlreadyExists(
                f"registry {location.claim} is already served by {RESOURCE_PREFIX}{owner}",
                reason="REGISTRY_ALREADY_CLAIMED",
                metadata={
                    "registry": location.claim,
                    "image_host": RESOURCE_PREFIX + str(owner),
                },
            )
            # A claim left behind by an interrupted non-atomic store: take it over.
        ops.append(
            Put(
                _claim_key(location),
                {"image_host_id": image_host_id, "claimed_at": now.isoformat()},
                claim.version if claim else 0,
            )
        )
        if release is not None:
            old = call_store(self._store.get, _claim_key(release))
            if old is not None and old.data.get("image_host_id") == image_host_id:
                ops.append(Delete(old.key, old.version))
        return ops

    def _commit(self, ops: Sequence[Operation]) -> dict[str, int]:
        try:
            return dict(call_store(self._store.commit, ops).versions)
        except VersionConflict as exc:
            raise Aborted(
                "the image host was changed concurrently; read it again and retry",
                reason="CONCURRENT_MODIFICATION",
                metadata={"key": exc.key},
            ) from None

    def _record(
        self, action: str, actor: Actor, host: ImageHost, details: Mapping[str, str]
    ) -> None:
        self._audit(
            AuditEvent(action=action, actor=actor, resource=host.name, details=dict(details))
        )
        for observer in self._observers:
            observer(host.id)


_T = TypeVar("_T")
_A = TypeVar("_A")


def _retry_unconditional(attempt: Callable[[], _T], etag: str = "") -> _T:
    """With an etag a lost race is the caller's to handle; without one, retry."""
    tries = 1 if etag else _UNCONDITIONAL_RETRIES
    for remaining in range(tries - 1, -1, -1):
        try:
            return attempt()
        except Aborted as exc:
            if remaining == 0 or exc.reason != "CONCURRENT_MODIFICATION":
                raise
    raise AssertionError("unreachable")


def _check_scope(actor: Actor, image_host_id: str) -> None:
    # Before any read: a principal learns nothing about hosts outside its scope.
    if not actor.may_use_host(image_host_id):
        raise PermissionDenied(
            f"principal {actor.principal} may not use {RESOURCE_PREFIX}{image_host_id}",
            reason="IMAGE_HOST_OUT_OF_SCOPE",
        )


def _shown(values: Sequence[str], limit: int = 3, width: int = 40) -> str:
    """Caller-supplied values for an error message: escaped, few and short."""
    shown = [repr(v if len(v) <= width else v[:width] + "...") for v in values[:limit]]
    more = len(values) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _check_etag(host: ImageHost, etag: str) -> None:
    if etag and etag != host.etag:
        raise Aborted(
            f"etag does not match the current version of {host.name}; read it again and retry",
            reason="ETAG_MISMATCH",
            metadata={"image_host": host.name},
        )


def _parse_url(url: str) -> RegistryLocation:
    try:
        return parse_registry_url(url)
    except InvalidRegistryUrl as exc:
        raise InvalidArgument.single("url", str(exc)) from None


def _validate_fields(display_name: str, username: str, token: Secret) -> None:
    violations: list[FieldViolation] = []
    problem = _text_violation(display_name, MAX_DISPLAY_NAME, allow_space=True)
    if problem:
        violations.append(FieldViolation("display_name", problem))
    violations += credential_violations(username, token)
    if violations:
        raise InvalidArgument(violations)


def validate_credentials(username: str, token: Secret) -> None:
    """The rules for a username and access token, wherever they come from."""
    violations = credential_violations(username, token)
    if violations:
        raise InvalidArgument(violations)


def credential_violations(username: str, token: Secret) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    problem = _text_violation(username, MAX_USERNAME, allow_space=False)
    if problem is None and ":" in username:
        problem = "must not contain ':' (registries split user:password at the first colon)"
    if problem:
        violations.append(FieldViolation("username", problem))
    secret = token.reveal()
    if len(secret) > MAX_ACCESS_TOKEN:
        violations.append(
            FieldViolation("access_token", f"must be at most {MAX_ACCESS_TOKEN} characters")
        )
    elif "\x00" in secret:
        violations.append(FieldViolation("access_token", "must not contain NUL characters"))
    if secret and not username:
        violations.append(FieldViolation("access_token", "needs a username to go with it"))
    return violations


def _claim_abandoned(claim: Entry, now: dt.datetime) -> bool:
    """Whether a claim whose host is missing was left behind (not a create in progress)."""
    try:
        claimed_at = dt.datetime.fromisoformat(str(claim.data["claimed_at"]))
    except (KeyError, ValueError):
        return True  # written before claims carried their time
    return now - claimed_at > CLAIM_TAKEOVER_AFTER


def _claim_key(location: RegistryLocation) -> str:
    encoded = base64.b32encode(location.claim.encode()).decode().rstrip("=").lower()
    return CLAIMS_PREFIX + encoded


def _host_data(
    display_name: str,
    url: str,
    username: str,
    token: Secret,
    create_time: dt.datetime,
    update_time: dt.datetime,
) -> dict[str, Any]:
    return {
        "display_name": display_name,
        "url": url,
        "username": username,
        "access_token": token.reveal(),
        "create_time": create_time.isoformat(),
        "update_time": update_time.isoformat(),
    }


def _default_data(
    image_host_id: str, reason: str, actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    return {
        "image_host_id": image_host_id,
        "reason": reason,
        "changed_by": actor.principal,
        "change_time": now.isoformat(),
    }


def _host_from_entry(entry: Entry, default_id: str | None) -> ImageHost:
    image_host_id = entry.key[len(HOSTS_PREFIX) :]
    return _host_from_data(image_host_id, entry.data, entry.version, image_host_id == default_id)


def _host_from_data(
    image_host_id: str, data: Mapping[str, Any], version: int, is_default: bool
) -> ImageHost:
    url = str(data["url"])
    return ImageHost(
        id=image_host_id,
        display_name=str(data["display_name"]),
        url=url,
        location=parse_registry_url(url),
        username=str(data["username"]),
        access_token=Secret(str(data.get("access_token", ""))),
        create_time=dt.datetime.fromisoformat(str(data["create_time"])),
        update_time=dt.datetime.fromisoformat(str(data["update_time"])),
        version=version,
        is_default=is_default,
    )


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    after = decode_page_token(token, "ListImageHosts", MAX_PAGE_TOKEN)
    if not isinstance(after, str) or not ID_RE.fullmatch(after):
        raise InvalidArgument.single("page_token", "is not a token returned by ListImageHosts")
    return after
