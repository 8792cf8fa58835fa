"""Kubernetes image pull secrets: provision, keep in sync, revoke (PullSecretService).

What the broker writes
- A Secret of type `kubernetes.io/dockerconfigjson` whose `.dockerconfigjson`
  is byte for byte what `kubectl create secret docker-registry` writes (see
  `broker.core.dockerconfig`), labelled `app.kubernetes.io/managed-by:
  credbroker` and annotated with `credbroker.dev/content-sha256` (sha256 hex of
  the `.dockerconfigjson` bytes; a digest does not fit a label value),
  `credbroker.dev/image-hosts` (the resource names it carries, comma-separated)
  and `credbroker.dev/installation` (see `pull_secret_store`).
- A reference `{"name": <secret>}` in `imagePullSecrets` of each service
  account (default: `default`).

Rules
- Only secrets labelled as managed by credbroker are ever changed or deleted; a
  secret of that name without the label is FAILED_PRECONDITION
  (SECRET_NOT_MANAGED) for its namespace, and one of another installation
  SECRET_MANAGED_ELSEWHERE. Its service accounts are then not touched either.
- `imagePullSecrets` is an atomic list: it is changed only by a JSON patch
  whose first operation tests `/metadata/resourceVersion` (the API server
  answers 422 when the test fails: read again and retry, a bounded number of
  times, then ABORTED). Never a merge or strategic-merge patch, which would
  replace the whole list. Every other entry survives; duplicates are left
  alone. A 422 after which the object's resourceVersion did not move was not a
  lost race: it is reported as it is. Secrets are written the same way
  (test-guarded JSON patch, or create), deletes carry a resourceVersion
  precondition.
- The `default` service account appears a moment after its namespace: when it
  is missing the broker polls for it with a bounded backoff
  (`Tuning.service_account_wait`, `--k8s-service-account-wait`), then reports
  NOT_FOUND for it. Other service accounts are not waited for. Dry runs never
  wait.
- Hosts without credentials add no entry. A provision whose hosts all lack
  credentials is FAILED_PRECONDITION (NO_CREDENTIALS); later, when every
  host a secret carries lost its credentials or was deleted, the reconciler
  writes `{"auths":{}}`: stale credentials never linger.
- Images are resolved once, at provisioning, by the CredentialResolver (the
  rules of ResolveCredentials); the secret then carries their image hosts.
  An image that resolves to no host adds nothing.
- Which hosts a secret carries is recorded in the broker's store (a
  provision replaces the list of its namespaces; service accounts accumulate;
  `keep_in_sync` once set stays until revoked). Rotation: every recorded
  secret is rewritten with the hosts' current credentials, whether kept in
  sync or not. Kept in sync: a deleted secret is recreated, a removed
  reference restored, and with a selector new matching namespaces are
  provisioned (with the union of the hosts of every kept-in-sync selector of
  that secret name that matches). Revoke writes a tombstone first, so that
  no reconciler provisions the namespace again while the revoke runs or
  after; an explicit provision lifts it.
- Scope: a principal limited to some image hosts names only those
  (PERMISSION_DENIED before any lookup, like every image-host RPC), and may
  change, revoke, list and sync only secrets that carry nothing else.
- Dry run: only reads; the response says exactly what would change.
- One namespace failing never stops the others; each result carries its
  error (code, reason, the API server's words). The call itself fails only
  before any namespace work, or with UNAVAILABLE when every namespace found
  the API server unreachable.

Nothing here logs or returns secret content; errors are scrubbed of the
credentials in play just in case an API server quoted them.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from broker.core.audit import SYSTEM_ACTOR, Actor, AuditEvent, AuditSink
from broker.core.cluster import (
    KUBERNETES_ALREADY_EXISTS,
    KUBERNETES_CONFLICT,
    KUBERNETES_INVALID,
    KUBERNETES_NOT_CONFIGURED,
    KUBERNETES_NOT_FOUND,
    KUBERNETES_UNREACHABLE,
    Cluster,
    KubeObject,
)
from broker.core.dockerconfig import (
    DOCKER_CONFIG_JSON_KEY,
    DOCKER_CONFIG_JSON_TYPE,
    PullSecretContent,
    build_content,
    decode_data,
)
from broker.core.errors import (
    Aborted,
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.core.image_hosts import RESOURCE_PREFIX, ImageHost, ImageHostCatalog
from broker.core.image_hosts import resource_name_to_id as _host_id
from broker.core.kube_names import (
    InvalidSelector,
    label_violation,
    normalise_selector,
    subdomain_violation,
)
from broker.core.pull_secret_store import Binding, PullSecretRegistry, Record
from broker.core.resolution import CredentialResolver
from broker.core.store_access import decode_page_token, encode_page_token

_log = logging.getLogger("credbroker.pullsecrets")

DEFAULT_SECRET_NAME = "credbroker-pull-secret"  # noqa: S105 - a Secret's name
DEFAULT_SERVICE_ACCOUNT = "default"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "credbroker"
SHA256_ANNOTATION = "credbroker.dev/content-sha256"
IMAGE_HOSTS_ANNOTATION = "credbroker.dev/image-hosts"
INSTALLATION_ANNOTATION = "credbroker.dev/installation"

MAX_NAMESPACES = 1000
MAX_IMAGE_HOSTS = 100
MAX_IMAGES = 100
MAX_SERVICE_ACCOUNTS = 50
MAX_IMAGE_LENGTH = 1024
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_PAGE_TOKEN = 512
MAX_AUDITED_DETAIL = 1024

#: Errors after which a write is retried from a fresh read.
_RETRIABLE = frozenset(
    {KUBERNETES_CONFLICT, KUBERNETES_INVALID, KUBERNETES_NOT_FOUND, KUBERNETES_ALREADY_EXISTS}
)
#: Upper bound on polls for a missing service account, whatever the clock does.
_MAX_POLLS = 200
_REDACTED = "[redacted]"

_T = TypeVar("_T")
_R = TypeVar("_R")


class _Unread(enum.Enum):
    """Not read yet (None already means "read: there is none")."""

    UNREAD = 0


class SecretChange(enum.Enum):
    CREATED = "CREATED"
    UPDATED = "UPDATED"
    UNCHANGED = "UNCHANGED"
    DELETED = "DELETED"
    ABSENT = "ABSENT"


class AccountChange(enum.Enum):
    PATCHED = "PATCHED"
    UNCHANGED = "UNCHANGED"
    NOT_FOUND = "NOT_FOUND"
    FAILED = "FAILED"


class SecretState(enum.Enum):
    CURRENT = "CURRENT"
    STALE = "STALE"
    MISSING = "MISSING"
    FOREIGN = "FOREIGN"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class AccountOutcome:
    name: str
    change: AccountChange
    error: BrokerError | None = None


@dataclass(frozen=True)
class NamespaceOutcome:
    namespace: str
    secret_name: str
    secret_change: SecretChange | None = None
    service_accounts: tuple[AccountOutcome, ...] = ()
    #: Image host ids the secret carries.
    image_hosts: tuple[str, ...] = ()
    error: BrokerError | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or any(a.error is not None for a in self.service_accounts)

    @property
    def changed(self) -> bool:
        return self.secret_change in (
            SecretChange.CREATED,
            SecretChange.UPDATED,
            SecretChange.DELETED,
        ) or any(a.change == AccountChange.PATCHED for a in self.service_accounts)


@dataclass(frozen=True)
class ProvisionRequest:
    namespaces: Sequence[str] = ()
    namespace_selector: str = ""
    image_hosts: Sequence[str] = ()
    images: Sequence[str] = ()
    secret_name: str = ""
    service_accounts: Sequence[str] = ()
    dry_run: bool = False
    keep_in_sync: bool = False


@dataclass(frozen=True)
class RevokeRequest:
    namespaces: Sequence[str] = ()
    namespace_selector: str = ""
    secret_name: str = ""
    dry_run: bool = False


@dataclass(frozen=True)
class ProvisionOutcome:
    results: list[NamespaceOutcome]
    #: Image host ids named or resolved.
    image_hosts: tuple[str, ...]
    dry_run: bool


@dataclass(frozen=True)
class ListedSecret:
    namespace: str
    secret_name: str
    image_hosts: tuple[str, ...]
    keep_in_sync: bool
    service_accounts: tuple[str, ...]
    state: SecretState
    content_sha256: str = ""
    error: BrokerError | None = None


@dataclass(frozen=True)
class ListPage:
    secrets: list[ListedSecret]
    next_page_token: str


@dataclass(frozen=True)
class Tuning:
    #: Seconds to wait for a missing `default` service account.
    service_account_wait: float = 10.0
    #: Writes that lost a race are retried this many times in all.
    conflict_attempts: int = 8
    #: First delay before a retry (doubles, with jitter), and its cap.
    retry_delay: float = 0.05
    max_retry_delay: float = 1.0
    #: First and largest delay between polls for a missing service account.
    poll_delay: float = 0.1
    max_poll_delay: float = 1.0
    #: Namespaces handled at once in one call.
    workers: int = 8


@dataclass(frozen=True)
class _Plan:
    """What a provision writes into every namespace."""

    secret_name: str
    host_ids: tuple[str, ...]
    content: PullSecretContent
    service_accounts: tuple[str, ...]
    installation: str
    dry_run: bool
    keep_in_sync: bool
    #: Strings that must never appear in an error message (credentials in play).
    sensitive: tuple[str, ...] = field(default=(), repr=False)


class PullSecretManager:
    """The domain service behind PullSecretService and the background reconciler."""

    def __init__(
        self,
        catalog: ImageHostCatalog,
        resolver: CredentialResolver,
        registry: PullSecretRegistry,
        cluster: Cluster | None,
        audit: AuditSink,
        tuning: Tuning | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._resolver = resolver
        self._registry = registry
        self._cluster = cluster
        self._audit = audit
        self._tuning = tuning or Tuning()
        self._sleep = sleep
        self._monotonic = monotonic

    @property
    def configured(self) -> bool:
        return self._cluster is not None

    @property
    def tuning(self) -> Tuning:
        return self._tuning

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)

    # -- ProvisionPullSecret ---------------------------------------------------

    def provision(self, request: ProvisionRequest, actor: Actor) -> ProvisionOutcome:
        names, selector = _validate_targets(request.namespaces, request.namespace_selector)
        secret_name = _validate_secret_name(request.secret_name)
        accounts = _validate_service_accounts(request.service_accounts)
        named = _validate_host_names(request.image_hosts)
        images = _validate_images(request.images)
        if not named and not images:
            raise InvalidArgument.single(
                "image_hosts", "name at least one image host (or give images to resolve)"
            )
        for image_host_id in named:
            _require_scope(actor, image_host_id)
        resolved = self._resolve_images(images, actor)
        hosts = self._hosts()
        missing = [i for i in named if i not in hosts]
        if missing:
            raise NotFound(
                f"{RESOURCE_PREFIX}{missing[0]} not found",
                reason="IMAGE_HOST_NOT_FOUND",
                metadata={"image_host": RESOURCE_PREFIX + missing[0]},
            )
        host_ids = tuple(dict.fromkeys([*named, *resolved]))
        content = build_content(hosts[i] for i in host_ids)
        if not content.image_host_ids:
            raise FailedPrecondition(
                "none of the image hosts has credentials (an access token): a pull secret "
                "would carry nothing",
                reason="NO_CREDENTIALS",
            )
        cluster = self._require_cluster()
        plan = _Plan(
            secret_name=secret_name,
            host_ids=host_ids,
            content=content,
            service_accounts=accounts,
            installation=self._registry.installation_id(create=not request.dry_run),
            dry_run=request.dry_run,
            keep_in_sync=request.keep_in_sync,
            sensitive=_sensitive(content, (hosts[i] for i in host_ids)),
        )
        targets = self._targets(cluster, names, selector)
        if selector and request.keep_in_sync and not request.dry_run:
            self._registry.put_binding(Binding(secret_name, selector, host_ids, accounts))
        results = self._each(
            targets, lambda t: self._provision_one(cluster, t[0], t[1], plan, actor)
        )
        _raise_if_unreachable(results)
        self._record(
            "ProvisionPullSecret",
            actor,
            results,
            {
                "secret_name": secret_name,
                "image_hosts": ",".join(RESOURCE_PREFIX + i for i in host_ids),
                "namespace_selector": selector,
                "keep_in_sync": _yes_no(request.keep_in_sync),
                "dry_run": _yes_no(request.dry_run),
            },
        )
        return ProvisionOutcome(results=results, image_hosts=host_ids, dry_run=request.dry_run)

    def _provision_one(
        self, cluster: Cluster, namespace: str, explicit: bool, plan: _Plan, actor: Actor
    ) -> NamespaceOutcome:
        name = plan.secret_name
        try:
            if explicit:
                _require_namespace(cluster, namespace)
            record = self._registry.record(namespace, name)
            if record is not None and record.active:
                _require_record_scope(actor, record)
            existing = cluster.get_secret(namespace, name)
            if existing is not None:
                _check_ownership(existing, namespace, name, plan.installation)
            if not plan.dry_run:

                def merge(current: Record | None) -> Record:
                    active = current if current is not None and current.active else None
                    if active is not None:
                        _require_record_scope(actor, active)
                    return Record(
                        namespace=namespace,
                        secret_name=name,
                        image_hosts=plan.host_ids,
                        service_accounts=_union(
                            active.service_accounts if active else (), plan.service_accounts
                        ),
                        keep_in_sync=plan.keep_in_sync or bool(active and active.keep_in_sync),
                        version=current.version if current else 0,
                    )

                self._registry.update_record(namespace, name, merge)
            change = self._ensure_secret(
                cluster,
                namespace,
                name,
                plan.content,
                plan.host_ids,
                plan.installation,
                dry_run=plan.dry_run,
                create=True,
            )
            accounts = tuple(
                self._add_reference(
                    cluster,
                    namespace,
                    account,
                    name,
                    dry_run=plan.dry_run,
                    wait=account == DEFAULT_SERVICE_ACCOUNT and not plan.dry_run,
                    sensitive=plan.sensitive,
                )
                for account in plan.service_accounts
            )
        except BrokerError as exc:
            return NamespaceOutcome(
                namespace, name, image_hosts=plan.host_ids, error=_scrub(exc, plan.sensitive)
            )
        return NamespaceOutcome(namespace, name, change, accounts, plan.host_ids)

    # -- RevokePullSecret ------------------------------------------------------

    def revoke(self, request: RevokeRequest, actor: Actor) -> list[NamespaceOutcome]:
        names, selector = _validate_targets(request.namespaces, request.namespace_selector)
        secret_name = _validate_secret_name(request.secret_name)
        cluster = self._require_cluster()
        bindings = [b for b in self._registry.bindings() if b.secret_name == secret_name]
        retired = [b for b in bindings if selector and b.namespace_selector == selector]
        for binding in retired:
            _require_hosts_scope(actor, binding.image_hosts)
        installation = self._registry.installation_id(create=False)
        targets = self._targets(cluster, names, selector)
        if not request.dry_run:
            # First: no reconciler provisions new namespaces for this selector any more.
            for binding in retired:
                self._registry.delete_binding(binding)
        tombstone = bool(bindings)
        results = self._each(
            targets,
            lambda t: self._revoke_one(
                cluster, t[0], t[1], secret_name, installation, request.dry_run, tombstone, actor
            ),
        )
        _raise_if_unreachable(results)
        self._record(
            "RevokePullSecret",
            actor,
            results,
            {
                "secret_name": secret_name,
                "namespace_selector": selector,
                "dry_run": _yes_no(request.dry_run),
            },
        )
        return results

    def _revoke_one(
        self,
        cluster: Cluster,
        namespace: str,
        explicit: bool,
        name: str,
        installation: str,
        dry_run: bool,
        selector_bindings: bool,
        actor: Actor,
    ) -> NamespaceOutcome:
        hosts: tuple[str, ...] = ()
        try:
            if explicit:
                _require_namespace(cluster, namespace)
            record = self._registry.record(namespace, name)
            active = record if record is not None and record.active else None
            if active is not None:
                _require_record_scope(actor, active)
                hosts = active.image_hosts
            existing = cluster.get_secret(namespace, name)
            if existing is not None:
                _check_ownership(existing, namespace, name, installation)
                if active is None:
                    # Not recorded (written by another broker version, or the record
                    # was lost): the secret itself says what it carries.
                    hosts = _annotated_hosts(existing)
                    _require_hosts_scope(actor, hosts)
            if not dry_run and (active is not None or selector_bindings):

                def tombstone(current: Record | None) -> Record:
                    if current is not None and current.active:
                        _require_record_scope(actor, current)
                    return Record(
                        namespace, name, revoked=True, version=current.version if current else 0
                    )

                # Before anything changes in the cluster: a reconciler must not put
                # back what this revoke removes.
                self._registry.update_record(namespace, name, tombstone)
            referencing = {
                _name_of(sa)
                for sa in cluster.list_service_accounts(namespace)
                if _references(sa.get("imagePullSecrets"), name)
            }
            accounts = sorted(referencing | set(active.service_accounts if active else ()))
            outcomes = tuple(
                self._remove_reference(cluster, namespace, account, name, dry_run=dry_run)
                for account in accounts
                if account
            )
            change = self._delete_secret(cluster, namespace, name, installation, dry_run)
        except BrokerError as exc:
            return NamespaceOutcome(namespace, name, image_hosts=hosts, error=exc)
        return NamespaceOutcome(namespace, name, change, outcomes, hosts)

    # -- ListPullSecrets -------------------------------------------------------

    def list_page(self, namespace: str, page_size: int, page_token: str, actor: Actor) -> ListPage:
        if namespace:
            problem = label_violation(namespace)
            if problem:
                raise InvalidArgument.single("namespace", problem)
        if page_size < 0:
            raise InvalidArgument.single("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token)
        cluster = self._require_cluster()
        records = [
            r
            for r in self._registry.records()
            if r.active
            and (not namespace or r.namespace == namespace)
            and (r.namespace, r.secret_name) > after
            and _in_scope(actor, r.image_hosts)
        ]
        page = records[:size]
        token = (
            encode_page_token([page[-1].namespace, page[-1].secret_name])
            if len(records) > size
            else ""
        )
        installation = self._registry.installation_id(create=False)
        hosts = self._hosts()
        listed = self._each(page, lambda r: self._inspect(cluster, r, hosts, installation))
        if listed and all(
            s.error is not None and s.error.reason == KUBERNETES_UNREACHABLE for s in listed
        ):
            error = listed[0].error
            assert error is not None
            raise error
        return ListPage(listed, token)

    def _inspect(
        self, cluster: Cluster, record: Record, hosts: Mapping[str, ImageHost], installation: str
    ) -> ListedSecret:
        carried = tuple(i for i in record.image_hosts if i in hosts)
        content = build_content(hosts[i] for i in carried)
        base = ListedSecret(
            namespace=record.namespace,
            secret_name=record.secret_name,
            image_hosts=carried,
            keep_in_sync=record.keep_in_sync,
            service_accounts=record.service_accounts,
            state=SecretState.UNKNOWN,
        )
        try:
            secret = cluster.get_secret(record.namespace, record.secret_name)
        except BrokerError as exc:
            return replace(base, error=_scrub(exc, _sensitive(content, ())))
        if secret is None:
            return replace(base, state=SecretState.MISSING)
        raw = decode_data(secret)
        digest = _sha256(raw) if raw is not None else ""
        try:
            _check_ownership(secret, record.namespace, record.secret_name, installation)
        except BrokerError:
            return replace(base, state=SecretState.FOREIGN, content_sha256=digest)
        current = _secret_is_current(secret, content, carried, installation)
        return replace(
            base,
            state=SecretState.CURRENT if current else SecretState.STALE,
            content_sha256=digest,
        )

    # -- SyncPullSecrets and the reconciler ------------------------------------

    def sync(
        self,
        actor: Actor = SYSTEM_ACTOR,
        *,
        dry_run: bool = False,
        strict: bool = True,
        carrying: frozenset[str] | None = None,
    ) -> list[NamespaceOutcome]:
        """Bring every managed secret (that `actor` may see) up to date.

        `strict`: a selector that cannot be listed fails the call; otherwise (the
        background reconciler) it is logged and the rest goes on.
        `carrying`: only the secrets recorded with one of these image host ids (what a
        credential change makes stale); no new namespaces are looked for then.
        """
        cluster = self._require_cluster()
        records = self._registry.records()
        bindings = self._registry.bindings()
        if carrying is not None:
            records = [r for r in records if carrying.intersection(r.image_hosts)]
            bindings = []
        if not records and not bindings:
            return []  # nothing to do: not a single request to the cluster
        installation = self._registry.installation_id(create=not dry_run)
        hosts = self._hosts()
        known = {(r.namespace, r.secret_name) for r in records}
        found: dict[tuple[str, str], Record] = {}
        for binding in sorted(bindings, key=lambda b: b.id):
            if not _in_scope(actor, binding.image_hosts):
                continue
            try:
                matching = _live_names(cluster.list_namespaces(binding.namespace_selector))
            except BrokerError as exc:
                if strict:
                    raise
                _log.warning(
                    "pull-secret sync: cannot list the namespaces matching %r: %s",
                    binding.namespace_selector,
                    exc.message,
                )
                continue
            for namespace in matching:
                key = (namespace, binding.secret_name)
                if key in known:
                    continue  # provisioned already, or revoked (a tombstone)
                earlier = found.get(key)
                found[key] = Record(
                    namespace=namespace,
                    secret_name=binding.secret_name,
                    image_hosts=_union(earlier.image_hosts if earlier else (), binding.image_hosts),
                    service_accounts=_union(
                        earlier.service_accounts if earlier else (), binding.service_accounts
                    ),
                    keep_in_sync=True,
                )
        work = [(r, False) for r in records if r.active and _in_scope(actor, r.image_hosts)]
        work += [(r, True) for r in found.values()]
        results = self._each(
            work, lambda w: self._sync_one(cluster, w[0], w[1], hosts, installation, dry_run)
        )
        outcomes = [o for o in results if o is not None]
        outcomes.sort(key=lambda o: (o.namespace, o.secret_name))
        _raise_if_unreachable(outcomes)
        if any(o.changed for o in outcomes) and not dry_run:
            self._record("SyncPullSecrets", actor, outcomes, {"dry_run": _yes_no(dry_run)})
        return outcomes

    def _sync_one(
        self,
        cluster: Cluster,
        record: Record,
        new: bool,
        hosts: Mapping[str, ImageHost],
        installation: str,
        dry_run: bool,
    ) -> NamespaceOutcome | None:
        namespace, name = record.namespace, record.secret_name
        carried = tuple(i for i in record.image_hosts if i in hosts)
        content = build_content(hosts[i] for i in carried)
        sensitive = _sensitive(content, (hosts[i] for i in carried))
        try:
            if new and not dry_run:
                created = self._registry.create_record(record)
                if created is None:
                    # Another replica got there first: follow what it recorded.
                    current = self._registry.record(namespace, name)
                    if current is None or not current.active:
                        return None
                    record = current
                    carried = tuple(i for i in record.image_hosts if i in hosts)
                    content = build_content(hosts[i] for i in carried)
                    sensitive = _sensitive(content, (hosts[i] for i in carried))
            if len(carried) < len(record.image_hosts) and not dry_run and not new:
                # Deleted hosts leave the record: a new host of the same id later is
                # another host, whose credentials were never meant for this secret.
                self._registry.update_record(namespace, name, _without_deleted_hosts(hosts))
            keep = record.keep_in_sync
            existing = cluster.get_secret(namespace, name)
            if keep and existing is None and cluster.get_namespace(namespace) is None:
                # Gone; provisioned again should a namespace of that name come back.
                return NamespaceOutcome(namespace, name, SecretChange.ABSENT, (), carried)
            change = self._ensure_secret(
                cluster,
                namespace,
                name,
                content,
                carried,
                installation,
                dry_run=dry_run,
                create=keep,
                first_read=existing,
            )
            accounts: tuple[AccountOutcome, ...] = ()
            if keep:
                wait = (new or change == SecretChange.CREATED) and not dry_run
                accounts = tuple(
                    self._add_reference(
                        cluster,
                        namespace,
                        account,
                        name,
                        dry_run=dry_run,
                        wait=wait and account == DEFAULT_SERVICE_ACCOUNT,
                        sensitive=sensitive,
                    )
                    for account in record.service_accounts
                )
        except BrokerError as exc:
            return NamespaceOutcome(
                namespace, name, image_hosts=carried, error=_scrub(exc, sensitive)
            )
        return NamespaceOutcome(namespace, name, change, accounts, carried)

    # -- the secret ------------------------------------------------------------

    def _ensure_secret(
        self,
        cluster: Cluster,
        namespace: str,
        name: str,
        content: PullSecretContent,
        host_ids: Sequence[str],
        installation: str,
        *,
        dry_run: bool,
        create: bool,
        first_read: KubeObject | _Unread | None = _Unread.UNREAD,
    ) -> SecretChange:
        """`first_read`: the secret as the caller just read it, saving one request."""
        attempts = _Attempts(self, f'secret "{name}" in namespace "{namespace}"')
        while True:
            if first_read is _Unread.UNREAD:
                current = cluster.get_secret(namespace, name)
            else:
                current, first_read = first_read, _Unread.UNREAD
            if current is None:
                if not create:
                    return SecretChange.ABSENT
                if dry_run:
                    return SecretChange.CREATED
                body = secret_body(namespace, name, content, host_ids, installation)
                try:
                    cluster.create_secret(namespace, body)
                except AlreadyExists as exc:
                    attempts.failed(exc, "")
                    continue
                return SecretChange.CREATED
            version = _resource_version(current)
            attempts.after_read(version)
            _check_ownership(current, namespace, name, installation)
            if _secret_is_current(current, content, host_ids, installation):
                return SecretChange.UNCHANGED
            if dry_run:
                return SecretChange.UPDATED
            try:
                cluster.patch_secret(
                    namespace, name, secret_patch(current, content, host_ids, installation)
                )
            except BrokerError as exc:
                if exc.reason not in _RETRIABLE:
                    raise
                attempts.failed(exc, version)
                continue
            return SecretChange.UPDATED

    def _delete_secret(
        self, cluster: Cluster, namespace: str, name: str, installation: str, dry_run: bool
    ) -> SecretChange:
        attempts = _Attempts(self, f'secret "{name}" in namespace "{namespace}"')
        while True:
            current = cluster.get_secret(namespace, name)
            if current is None:
                return SecretChange.ABSENT
            version = _resource_version(current)
            attempts.after_read(version)
            _check_ownership(current, namespace, name, installation)
            if dry_run:
                return SecretChange.DELETED
            try:
                cluster.delete_secret(namespace, name, version)
            except BrokerError as exc:
                if exc.reason not in _RETRIABLE:
                    raise
                attempts.failed(exc, version)
                continue
            return SecretChange.DELETED

    # -- service accounts ------------------------------------------------------

    def _add_reference(
        self,
        cluster: Cluster,
        namespace: str,
        account: str,
        secret_name: str,
        *,
        dry_run: bool,
        wait: bool,
        sensitive: Sequence[str] = (),
    ) -> AccountOutcome:
        """Reference the secret from one service account; its failure is its own."""
        try:
            return self._try_add_reference(
                cluster, namespace, account, secret_name, dry_run=dry_run, wait=wait
            )
        except BrokerError as exc:
            return AccountOutcome(account, AccountChange.FAILED, _scrub(exc, sensitive))

    def _remove_reference(
        self, cluster: Cluster, namespace: str, account: str, secret_name: str, *, dry_run: bool
    ) -> AccountOutcome:
        """Drop the secret's references from one service account; its failure is its own."""
        try:
            return self._try_remove_reference(
                cluster, namespace, account, secret_name, dry_run=dry_run
            )
        except BrokerError as exc:
            return AccountOutcome(account, AccountChange.FAILED, exc)

    def _try_add_reference(
        self,
        cluster: Cluster,
        namespace: str,
        account: str,
        secret_name: str,
        *,
        dry_run: bool,
        wait: bool,
    ) -> AccountOutcome:
        attempts = _Attempts(self, f'service account "{account}" in namespace "{namespace}"')
        budget = self._tuning.service_account_wait if wait else 0.0
        deadline = self._monotonic() + budget
        delay = self._tuning.poll_delay
        waited = False
        for _ in range(_MAX_POLLS):
            sa = cluster.get_service_account(namespace, account)
            if sa is None:
                remaining = deadline - self._monotonic()
                if remaining > 0:
                    self._sleep(min(delay, remaining))
                    delay = min(delay * 2, self._tuning.max_poll_delay)
                    waited = True
                    continue
                suffix = f" (waited {budget:g} s for it to appear)" if waited else ""
                return AccountOutcome(
                    account,
                    AccountChange.NOT_FOUND,
                    NotFound(
                        f'serviceaccounts "{account}" not found{suffix}',
                        reason="SERVICE_ACCOUNT_NOT_FOUND",
                        metadata={"namespace": namespace, "service_account": account},
                    ),
                )
            version = _resource_version(sa)
            attempts.after_read(version)
            entries = sa.get("imagePullSecrets")
            if _references(entries, secret_name):
                return AccountOutcome(account, AccountChange.UNCHANGED)
            if dry_run:
                return AccountOutcome(account, AccountChange.PATCHED)
            try:
                cluster.patch_service_account(
                    namespace, account, add_reference_patch(version, entries, secret_name)
                )
            except BrokerError as exc:
                if exc.reason not in _RETRIABLE:
                    raise
                attempts.failed(exc, version)
                continue
            return AccountOutcome(account, AccountChange.PATCHED)
        raise attempts.exhausted()

    def _try_remove_reference(
        self, cluster: Cluster, namespace: str, account: str, secret_name: str, *, dry_run: bool
    ) -> AccountOutcome:
        attempts = _Attempts(self, f'service account "{account}" in namespace "{namespace}"')
        while True:
            sa = cluster.get_service_account(namespace, account)
            if sa is None:
                return AccountOutcome(account, AccountChange.UNCHANGED)
            version = _resource_version(sa)
            attempts.after_read(version)
            patch = remove_reference_patch(version, sa.get("imagePullSecrets"), secret_name)
            if patch is None:
                return AccountOutcome(account, AccountChange.UNCHANGED)
            if dry_run:
                return AccountOutcome(account, AccountChange.PATCHED)
            try:
                cluster.patch_service_account(namespace, account, patch)
            except BrokerError as exc:
                if exc.reason not in _RETRIABLE:
                    raise
                attempts.failed(exc, version)
                continue
            return AccountOutcome(account, AccountChange.PATCHED)

    # -- helpers ---------------------------------------------------------------

    def _require_cluster(self) -> Cluster:
        if self._cluster is None:
            raise FailedPrecondition(
                "no Kubernetes cluster is configured: start the broker with --kubeconfig "
                "(or KUBECONFIG) and optionally --kube-context, or run it in a pod with a "
                "service account",
                reason=KUBERNETES_NOT_CONFIGURED,
            )
        return self._cluster

    def _hosts(self) -> dict[str, ImageHost]:
        return {h.id: h for h in self._catalog.all_hosts()}

    def _resolve_images(self, images: Sequence[str], actor: Actor) -> list[str]:
        found: list[str] = []
        for index, image in enumerate(images):
            try:
                resolution = self._resolver.resolve(image, actor)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    [
                        FieldViolation(f"images[{index}]", v.description)
                        if v.field == "image"
                        else v
                        for v in exc.violations
                    ],
                    reason=exc.reason,
                ) from None
            if resolution.host is not None:
                found.append(resolution.host.id)
        return found

    def _targets(
        self, cluster: Cluster, names: Sequence[str], selector: str
    ) -> list[tuple[str, bool]]:
        """(namespace, named explicitly) in namespace order."""
        targets = dict.fromkeys(names, True)
        if selector:
            for namespace in _live_names(cluster.list_namespaces(selector)):
                targets.setdefault(namespace, False)
        return sorted(targets.items())

    def _each(self, items: Sequence[_T], work: Callable[[_T], _R]) -> list[_R]:
        if len(items) <= 1:
            return [work(item) for item in items]
        workers = max(1, min(self._tuning.workers, len(items)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pullsecrets") as pool:
            return list(pool.map(work, items))

    def _record(
        self,
        action: str,
        actor: Actor,
        results: Sequence[NamespaceOutcome],
        details: Mapping[str, str],
    ) -> None:
        counts: dict[str, int] = {}
        for outcome in results:
            key = (
                "failed"
                if outcome.failed
                else (outcome.secret_change.value.lower() if outcome.secret_change else "failed")
            )
            counts[key] = counts.get(key, 0) + 1
        summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
        # Callers choose some of these strings: keep one audit line bounded.
        bounded = {k: v[:MAX_AUDITED_DETAIL] for k, v in details.items()}
        self._audit(
            AuditEvent(
                action=action,
                actor=actor,
                resource="",
                details={**bounded, "namespaces": str(len(results)), "results": summary},
            )
        )


class _Attempts:
    """Bounded retries of a read + guarded write, with jittered exponential backoff.

    A 422 (a failed `test` op) is a lost race only if the object changed: when the
    next read shows the same resourceVersion, the 422 meant something else and is
    raised as it is.
    """

    def __init__(self, manager: PullSecretManager, what: str) -> None:
        self._tuning = manager.tuning
        self._sleep = manager.sleep
        self._what = what
        self._count = 0
        self._invalid: tuple[str, BrokerError] | None = None
        self._last: BrokerError | None = None

    def after_read(self, version: str) -> None:
        if self._invalid is not None and self._invalid[0] == version:
            raise self._invalid[1]
        self._invalid = None

    def failed(self, error: BrokerError, version: str) -> None:
        tuning = self._tuning
        self._count += 1
        self._last = error
        if error.reason == KUBERNETES_INVALID:
            self._invalid = (version, error)
        if self._count >= tuning.conflict_attempts:
            raise self.exhausted()
        delay = min(tuning.retry_delay * 2 ** (self._count - 1), tuning.max_retry_delay)
        jitter = secrets.randbelow(1000) / 1000  # 0 .. 1: spread competing writers apart
        self._sleep(delay * (0.5 + jitter))

    def exhausted(self) -> Aborted:
        said = f": {self._last.message}" if self._last is not None else ""
        return Aborted(
            f"{self._what} kept changing under the broker; gave up after "
            f"{self._count} attempts{said}",
            reason=KUBERNETES_CONFLICT,
        )


# -- objects and patches --------------------------------------------------------


def _pointer(key: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _annotations(
    content: PullSecretContent, host_ids: Sequence[str], installation: str
) -> dict[str, str]:
    annotations = {
        SHA256_ANNOTATION: content.sha256,
        IMAGE_HOSTS_ANNOTATION: ",".join(RESOURCE_PREFIX + i for i in host_ids),
    }
    if installation:
        annotations[INSTALLATION_ANNOTATION] = installation
    return annotations


def secret_body(
    namespace: str,
    name: str,
    content: PullSecretContent,
    host_ids: Sequence[str],
    installation: str,
) -> KubeObject:
    """The Secret the broker creates."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
            "annotations": _annotations(content, host_ids, installation),
        },
        "type": DOCKER_CONFIG_JSON_TYPE,
        "data": {DOCKER_CONFIG_JSON_KEY: content.base64},
    }


def secret_patch(
    current: KubeObject,
    content: PullSecretContent,
    host_ids: Sequence[str],
    installation: str,
) -> list[KubeObject]:
    """A JSON patch that gives `current` this content, guarded by its resourceVersion.

    `data` is replaced as a whole (the secret is the broker's); labels and
    annotations of others stay.
    """
    metadata = current.get("metadata") or {}
    ops: list[KubeObject] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": _resource_version(current)},
        {"op": "add", "path": "/data", "value": {DOCKER_CONFIG_JSON_KEY: content.base64}},
    ]
    wanted = {
        "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
        "annotations": _annotations(content, host_ids, installation),
    }
    for section, values in wanted.items():
        existing = metadata.get(section)
        if isinstance(existing, dict):
            ops += [
                {"op": "add", "path": f"/metadata/{section}/{_pointer(k)}", "value": v}
                for k, v in values.items()
                if existing.get(k) != v
            ]
        else:
            ops.append({"op": "add", "path": f"/metadata/{section}", "value": values})
    return ops


def add_reference_patch(version: str, entries: Any, secret_name: str) -> list[KubeObject]:
    """Append `{"name": secret_name}` to imagePullSecrets, guarded by resourceVersion.

    `add /imagePullSecrets/-` fails when the field is absent: then the whole list
    is added (there was nothing to keep).
    """
    test = {"op": "test", "path": "/metadata/resourceVersion", "value": version}
    if isinstance(entries, list):
        return [test, {"op": "add", "path": "/imagePullSecrets/-", "value": {"name": secret_name}}]
    return [test, {"op": "add", "path": "/imagePullSecrets", "value": [{"name": secret_name}]}]


def remove_reference_patch(version: str, entries: Any, secret_name: str) -> list[KubeObject] | None:
    """Remove every entry naming `secret_name` and nothing else; None when there is none."""
    if not isinstance(entries, list):
        return None
    indices = [
        i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("name") == secret_name
    ]
    if not indices:
        return None
    ops: list[KubeObject] = [{"op": "test", "path": "/metadata/resourceVersion", "value": version}]
    for index in reversed(indices):
        ops.append({"op": "test", "path": f"/imagePullSecrets/{index}/name", "value": secret_name})
        ops.append({"op": "remove", "path": f"/imagePullSecrets/{index}"})
    return ops


def _references(entries: Any, secret_name: str) -> bool:
    return isinstance(entries, list) and any(
        isinstance(e, dict) and e.get("name") == secret_name for e in entries
    )


def _secret_is_current(
    secret: KubeObject, content: PullSecretContent, host_ids: Sequence[str], installation: str
) -> bool:
    data = secret.get("data")
    if not isinstance(data, dict) or set(data) != {DOCKER_CONFIG_JSON_KEY}:
        return False
    if decode_data(secret) != content.raw:
        return False
    metadata = secret.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    return labels.get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE and all(
        annotations.get(k) == v for k, v in _annotations(content, host_ids, installation).items()
    )


def _check_ownership(secret: KubeObject, namespace: str, name: str, installation: str) -> None:
    metadata = secret.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    where = f'secret "{name}" in namespace "{namespace}"'
    info = {"namespace": namespace, "secret": name}
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY_VALUE:
        raise FailedPrecondition(
            f"{where} is not managed by credbroker (it lacks the label "
            f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}): the broker leaves it alone; "
            "choose another secret name or remove that secret",
            reason="SECRET_NOT_MANAGED",
            metadata=info,
        )
    owner = annotations.get(INSTALLATION_ANNOTATION) or ""
    if owner and owner != installation:
        raise FailedPrecondition(
            f"{where} is managed by another credbroker installation (another store): "
            "the broker leaves it alone",
            reason="SECRET_MANAGED_ELSEWHERE",
            metadata=info,
        )
    kind = secret.get("type")
    if kind != DOCKER_CONFIG_JSON_TYPE:
        raise FailedPrecondition(
            f"{where} is of type {str(kind)[:100]!r}, not {DOCKER_CONFIG_JSON_TYPE} "
            "(a Secret's type cannot change): the broker leaves it alone",
            reason="SECRET_TYPE_MISMATCH",
            metadata=info,
        )


def _annotated_hosts(secret: KubeObject) -> tuple[str, ...]:
    metadata = secret.get("metadata") or {}
    value = str((metadata.get("annotations") or {}).get(IMAGE_HOSTS_ANNOTATION) or "")
    return tuple(part.removeprefix(RESOURCE_PREFIX) for part in value.split(",") if part.strip())


def _resource_version(obj: KubeObject) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _name_of(obj: KubeObject) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _live_names(namespaces: Iterable[KubeObject]) -> list[str]:
    """Names of the namespaces that are not being terminated."""
    names = []
    for namespace in namespaces:
        phase = (namespace.get("status") or {}).get("phase")
        name = _name_of(namespace)
        if name and phase != "Terminating":
            names.append(name)
    return sorted(set(names))


def _require_namespace(cluster: Cluster, namespace: str) -> None:
    if cluster.get_namespace(namespace) is None:
        raise NotFound(
            f'namespaces "{namespace}" not found',
            reason=KUBERNETES_NOT_FOUND,
            metadata={"namespace": namespace},
        )


def _raise_if_unreachable(results: Sequence[NamespaceOutcome]) -> None:
    """When every namespace found the API server unreachable, the call fails with it."""
    errors = [o.error for o in results]
    if errors and all(e is not None and e.reason == KUBERNETES_UNREACHABLE for e in errors):
        error = errors[0]
        assert error is not None
        raise error


# -- scope ----------------------------------------------------------------------


def _require_scope(actor: Actor, image_host_id: str) -> None:
    # Before any read: a principal learns nothing about hosts outside its scope.
    if not actor.may_use_host(image_host_id):
        raise PermissionDenied(
            f"principal {actor.principal} may not use {RESOURCE_PREFIX}{image_host_id}",
            reason="IMAGE_HOST_OUT_OF_SCOPE",
        )


def _in_scope(actor: Actor, host_ids: Iterable[str]) -> bool:
    return all(actor.may_use_host(i) for i in host_ids)


def _require_hosts_scope(actor: Actor, host_ids: Iterable[str]) -> None:
    if not _in_scope(actor, host_ids):
        raise PermissionDenied(
            f"principal {actor.principal} may not change a pull secret that carries "
            "image hosts outside its scope",
            reason="PULL_SECRET_OUT_OF_SCOPE",
        )


def _require_record_scope(actor: Actor, record: Record) -> None:
    _require_hosts_scope(actor, record.image_hosts)


# -- validation -----------------------------------------------------------------


def _validate_targets(namespaces: Sequence[str], selector: str) -> tuple[list[str], str]:
    if len(namespaces) > MAX_NAMESPACES:
        raise InvalidArgument.single("namespaces", f"must name at most {MAX_NAMESPACES}")
    violations = []
    for index, namespace in enumerate(namespaces):
        problem = label_violation(namespace)
        if problem:
            violations.append(FieldViolation(f"namespaces[{index}]", problem))
    normalised = ""
    if selector:
        try:
            normalised = normalise_selector(selector)
        except InvalidSelector as exc:
            violations.append(
                FieldViolation("namespace_selector", f"is not a label selector: {exc}")
            )
    if violations:
        raise InvalidArgument(violations)
    if not namespaces and not selector:
        raise InvalidArgument.single(
            "namespaces", "name at least one namespace, or give a namespace_selector"
        )
    return list(dict.fromkeys(namespaces)), normalised


def _validate_secret_name(name: str) -> str:
    if not name:
        return DEFAULT_SECRET_NAME
    problem = subdomain_violation(name)
    if problem:
        raise InvalidArgument.single("secret_name", problem)
    return name


def _validate_service_accounts(accounts: Sequence[str]) -> tuple[str, ...]:
    if not accounts:
        return (DEFAULT_SERVICE_ACCOUNT,)
    if len(accounts) > MAX_SERVICE_ACCOUNTS:
        raise InvalidArgument.single(
            "service_accounts", f"must name at most {MAX_SERVICE_ACCOUNTS}"
        )
    violations = [
        FieldViolation(f"service_accounts[{i}]", problem)
        for i, account in enumerate(accounts)
        if (problem := subdomain_violation(account))
    ]
    if violations:
        raise InvalidArgument(violations)
    return tuple(dict.fromkeys(accounts))


def _validate_host_names(names: Sequence[str]) -> list[str]:
    if len(names) > MAX_IMAGE_HOSTS:
        raise InvalidArgument.single("image_hosts", f"must name at most {MAX_IMAGE_HOSTS}")
    return list(dict.fromkeys(_host_id(n, f"image_hosts[{i}]") for i, n in enumerate(names)))


def _validate_images(images: Sequence[str]) -> list[str]:
    if len(images) > MAX_IMAGES:
        raise InvalidArgument.single("images", f"must name at most {MAX_IMAGES}")
    for index, image in enumerate(images):
        if not image:
            raise InvalidArgument.single(f"images[{index}]", "is empty")
        if len(image) > MAX_IMAGE_LENGTH:
            raise InvalidArgument.single(
                f"images[{index}]", f"must be at most {MAX_IMAGE_LENGTH} characters"
            )
    return list(dict.fromkeys(images))


def _decode_page_token(token: str) -> tuple[str, str]:
    if not token:
        return ("", "")
    invalid = InvalidArgument.single("page_token", "is not a token returned by ListPullSecrets")
    after = decode_page_token(token, "ListPullSecrets", MAX_PAGE_TOKEN)
    if (
        not isinstance(after, list)
        or len(after) != 2
        or not all(isinstance(p, str) for p in after)
        or label_violation(after[0])
        or subdomain_violation(after[1])
    ):
        raise invalid
    return (after[0], after[1])


# -- small helpers --------------------------------------------------------------


def _without_deleted_hosts(
    hosts: Mapping[str, ImageHost],
) -> Callable[[Record | None], Record | None]:
    def change(current: Record | None) -> Record | None:
        if current is None or not current.active:
            return current
        return replace(current, image_hosts=tuple(i for i in current.image_hosts if i in hosts))

    return change


def _union(first: Iterable[str], second: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*first, *second]))


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _sensitive(content: PullSecretContent, hosts: Iterable[ImageHost]) -> tuple[str, ...]:
    """Every form in which the credentials of a write could show up in a message."""
    values = [content.base64]
    try:
        auths = json.loads(content.raw)["auths"]
    except (ValueError, KeyError):  # pragma: no cover - build_content writes valid JSON
        auths = {}
    values += [str(entry.get("auth", "")) for entry in auths.values()]
    values += [h.access_token.reveal() for h in hosts]
    return tuple(v for v in values if len(v) >= 4)


def _scrub(error: BrokerError, sensitive: Sequence[str]) -> BrokerError:
    text = error.message
    for value in sensitive:
        text = text.replace(value, _REDACTED)
    if text == error.message:
        return error
    clean = copy.copy(error)
    clean.message = text
    clean.args = (text,)
    return clean
