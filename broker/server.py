"""Builds and runs the gRPC server."""

from __future__ import annotations

import faulthandler
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker.api.credentials import CredentialServicer
from broker.api.errors import ErrorMappingInterceptor, RequestDecodingInterceptor
from broker.api.image_hosts import ImageHostServicer
from broker.api.pull_secrets import PullSecretServicer
from broker.api.pulls import PullServicer
from broker.config import ServerConfig
from broker.core.connection_test import ConnectionTester
from broker.core.errors import BrokerError
from broker.core.image_hosts import DEFAULT_KEY, ImageHostCatalog
from broker.core.pull_secret_store import PullSecretRegistry
from broker.core.pull_secret_sync import PullSecretReconciler
from broker.core.pull_secrets import PullSecretManager, Tuning
from broker.core.pulls import Puller, Pulls
from broker.core.resolution import CredentialResolver
from broker.core.swarm import SwarmPuller
from broker.engines.docker_engine import DockerEngine
from broker.engines.kubernetes_engine import ClusterConfigError, ClusterSettings, open_cluster
from broker.engines.registry import RegistryProber
from broker.engines.swarm_engine import SwarmEngine
from broker.security.audit import AuditTrail
from broker.security.authz import unclassified
from broker.security.interceptor import SecurityInterceptor
from broker.security.principals import PrincipalRegistry, PrincipalsError, PrincipalsFile
from broker.security.ratelimit import TokenBuckets
from broker.security.tls import TlsConfigError, TlsFiles, server_credentials
from broker.stores.base import SecretStore, StoreError
from broker.stores.cache import CachedStore
from broker.stores.factory import open_backend
from broker.v1 import (
    credentials_pb2,
    credentials_pb2_grpc,
    image_hosts_pb2,
    image_hosts_pb2_grpc,
    pull_secrets_pb2,
    pull_secrets_pb2_grpc,
    pulls_pb2,
    pulls_pb2_grpc,
)

_log = logging.getLogger("credbroker")

SERVICES = (
    image_hosts_pb2.DESCRIPTOR.services_by_name["ImageHostService"],
    credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"],
    pulls_pb2.DESCRIPTOR.services_by_name["PullService"],
    pull_secrets_pb2.DESCRIPTOR.services_by_name["PullSecretService"],
)
SERVICE_NAMES: Sequence[str] = tuple(s.full_name for s in SERVICES)
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024


class _WithholdUndecodableMetadata(logging.Filter):
    """grpc logs a metadata value that is not UTF-8 verbatim, at ERROR with a traceback
    ("Invalid encoding on b'Bearer <token>\\xff'"): such a value is often a credential.
    Keep the fact, drop the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Invalid encoding on %s":
            record.msg = "a call carried a metadata value that is not UTF-8 (value withheld)"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_WithholdUndecodableMetadata())


class StartupError(Exception):
    """The server cannot start as configured; the message says what to fix."""


# A health "service" that only reports the store: NOT_SERVING while degraded or
# unavailable. For alerts; readiness probes use "" (NOT_SERVING only when unavailable).
STORE_HEALTH_NAME = "credbroker.SecretStore"
STORE_HEALTH_INTERVAL = 1.0


class StoreHealthWatch:
    """Mirrors the cache's view of the store into the gRPC health service.

    Degraded (serving cached entries while the store is down): every service stays
    SERVING, STORE_HEALTH_NAME turns NOT_SERVING. Unavailable (nothing recent enough
    to serve): the services and "" turn NOT_SERVING too. The cache logs the changes.
    """

    def __init__(
        self,
        store: CachedStore,
        servicer: health.HealthServicer,
        interval: float = STORE_HEALTH_INTERVAL,
    ) -> None:
        self._store = store
        self._servicer = servicer
        self._interval = interval
        self._state = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-health", daemon=True)

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 10)

    def check(self) -> None:
        state = self._store.health().state
        if state == self._state:
            return
        self._state = state
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = not_serving if state == "unavailable" else serving
        for name in (*SERVICE_NAMES, ""):
            self._servicer.set(name, overall)
        self._servicer.set(STORE_HEALTH_NAME, serving if state == "ok" else not_serving)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._state not in ("", "ok"):
                self._store.probe(DEFAULT_KEY)  # reads alone never come while unready
            self.check()


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    store_watch: StoreHealthWatch | None = None
    reconciler: PullSecretReconciler | None = None

    def stop(self, grace: float) -> None:
        if self.store_watch is not None:
            self.store_watch.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
        # Tell load balancers first, then let in-flight calls finish.
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def registered_methods() -> list[str]:
    return [f"/{s.full_name}/{m.name}" for s in SERVICES for m in s.methods]


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _tls_files(config: ServerConfig) -> TlsFiles | None:
    if config.tls_cert is None and config.tls_key is None:
        if config.client_ca is not None:
            raise StartupError("--client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    return TlsFiles(config.tls_cert, config.tls_key, config.client_ca)


def transport_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """Check the transport settings; None means plaintext. Runs before anything is written."""
    missing = unclassified(registered_methods())
    if missing:
        raise StartupError(f"RPCs without an authorisation rule: {', '.join(missing)}")
    tls = _tls_files(config)
    if tls is None:
        if not is_loopback(config.address) and not config.insecure_allow_plaintext:
            raise StartupError(
                f"refusing to serve plaintext on {config.address}, which is not a loopback "
                "address: give --tls-cert and --tls-key, or --insecure-allow-plaintext if you "
                "really mean it"
            )
        return None
    try:
        return server_credentials(tls)
    except TlsConfigError as exc:
        raise StartupError(str(exc)) from None


def start_server(
    config: ServerConfig,
    store: SecretStore,
    audit: AuditTrail,
    principals: PrincipalRegistry,
    credentials: grpc.ServerCredentials | None,
) -> RunningServer:
    catalog = ImageHostCatalog(store, audit)
    if catalog.ensure_seeded():
        _log.info("empty store: seeded Docker Hub (anonymous) as the default image host")
    try:
        cluster = open_cluster(ClusterSettings(config.kubeconfig, config.kube_context))
    except ClusterConfigError as exc:
        raise StartupError(str(exc)) from None

    security = SecurityInterceptor(
        principals,
        audit,
        call_rate=TokenBuckets(rate=config.rate_limit, burst=2 * config.rate_limit),
        failed_logins=TokenBuckets(
            rate=1 / config.auth_failure_refill_seconds, burst=config.auth_failure_burst
        ),
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        # The first interceptor is the outermost: errors of the others are mapped too.
        interceptors=[ErrorMappingInterceptor(), security, RequestDecodingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    resolver = CredentialResolver(catalog, audit)
    tester = ConnectionTester(catalog, RegistryProber(ca_bundle=config.registry_ca_file), audit)
    image_hosts_pb2_grpc.add_ImageHostServiceServicer_to_server(
        ImageHostServicer(catalog, tester), server
    )
    credentials_pb2_grpc.add_CredentialServiceServicer_to_server(
        CredentialServicer(resolver), server
    )
    pulls_pb2_grpc.add_PullServiceServicer_to_server(
        PullServicer(Pulls(Puller(resolver, DockerEngine()), SwarmPuller(resolver, SwarmEngine()))),
        server,
    )
    pull_secrets = PullSecretManager(
        catalog,
        resolver,
        PullSecretRegistry(store),
        cluster,
        audit,
        Tuning(service_account_wait=config.k8s_service_account_wait),
    )
    pull_secrets_pb2_grpc.add_PullSecretServiceServicer_to_server(
        PullSecretServicer(pull_secrets), server
    )
    reconciler = None
    if cluster is not None:
        reconciler = PullSecretReconciler(pull_secrets, config.k8s_sync_interval)
        catalog.add_observer(reconciler.trigger)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    store_watch = None
    if isinstance(store, CachedStore):
        store_watch = StoreHealthWatch(store, health_servicer)
        store_watch.start()
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    host = f"[{config.address}]" if ":" in config.address else config.address
    target = f"{host}:{config.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {target}: {exc}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {target}")
    server.start()
    modes = {None: "plaintext", False: "TLS", True: "mutual TLS"}
    mode = modes[None if credentials is None else config.client_ca is not None]
    _log.info("listening on %s:%d (%s, store: %s)", host, port, mode, config.data_dir)
    if reconciler is not None and cluster is not None:
        _log.info(
            "pull secrets: Kubernetes API at %s, sync every %gs",
            cluster.server,
            config.k8s_sync_interval,
        )
        reconciler.start()
    return RunningServer(
        server=server,
        health=health_servicer,
        port=port,
        store_watch=store_watch,
        reconciler=reconciler,
    )


def ensure_admin(config: ServerConfig) -> bool:
    """Secure by default: the first start creates an admin principal and its token file."""
    source = PrincipalsFile(config.principals_path)
    if source.exists():
        return False
    try:
        token = source.add("admin", ["admin"])
    except PrincipalsError:
        return False  # another process created it first
    assert token is not None
    fd = os.open(config.admin_token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover file keeps its mode through O_TRUNC
        os.write(fd, token.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _open_audit(config: ServerConfig) -> TextIO:
    if config.audit_log == "-":
        return sys.stderr
    fd = os.open(config.audit_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8")


def open_cached_store(config: ServerConfig) -> CachedStore:
    """The configured store behind the read-through cache (see DESIGN.md, Storage)."""
    if config.cache_ttl < 0 or config.cache_stale_window < config.cache_ttl:
        raise StartupError(
            "--cache-ttl must not be negative and --cache-stale-window must be at least "
            f"--cache-ttl (got {config.cache_ttl:g} and {config.cache_stale_window:g})"
        )
    return CachedStore(
        open_backend(config), ttl=config.cache_ttl, stale_window=config.cache_stale_window
    )


def serve(config: ServerConfig) -> int:
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # `kill -USR2 <pid>` prints every thread's stack to stderr: for a broker that hangs.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _log.info("%s received: finishing in-flight calls", signal.Signals(signum).name)
        stop.set()

    # Before the server listens: a SIGTERM right after "listening on" must still stop
    # it gracefully (a signal during startup is handled once startup is done).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        credentials = transport_credentials(config)
        store = open_cached_store(config)
        created_admin = ensure_admin(config)
        principals = PrincipalRegistry(PrincipalsFile(config.principals_path))
        audit_stream = _open_audit(config)
        running = start_server(config, store, AuditTrail(audit_stream), principals, credentials)
    except StoreError as exc:
        _log.error("cannot open the store: %s", exc)
        return 2
    except (StartupError, PrincipalsError, OSError, BrokerError) as exc:
        _log.error("cannot start: %s", exc)
        return 2

    if created_admin:
        tls_flag = "-plaintext" if config.tls_cert is None else "-cacert CA.pem"
        # -expand-headers lets grpcurl read the token from the environment, so it
        # never appears in the process list or the shell history.
        _log.info(
            "created the admin principal; its bearer token is in %s (mode 0600). Try:\n"
            '  export CREDBROKER_TOKEN="$(cat %s)"\n'
            "  grpcurl %s -expand-headers -H 'authorization: Bearer ${CREDBROKER_TOKEN}' "
            "%s:%d broker.v1.ImageHostService/ListImageHosts",
            config.admin_token_path,
            config.admin_token_path,
            tls_flag,
            config.address,
            running.port,
        )

    stop.wait()
    running.stop(config.grace_seconds)
    store.close()
    if audit_stream is not sys.stderr:
        audit_stream.close()
    _log.info("stopped")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # The grace period is over and the store is closed. A handler thread still stuck
    # in a call to a dependency must not keep the process alive (Python would wait
    # for every worker thread at exit).
    os._exit(0)
