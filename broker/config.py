"""Server settings from flags, then CREDBROKER_* environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 50051


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


def env_path(name: str) -> Path | None:
    """The path in environment variable `name`, None when unset or empty."""
    value = os.environ.get(name)
    return Path(value) if value else None


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "credbroker"


@dataclass(frozen=True)
class VaultOptions:
    """Where the Vault store lives and how the broker logs in (see README, Vault)."""

    url: str
    mount: str = "secret"
    prefix: str = "credbroker"
    namespace: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    auth: str = "token"
    token_file: Path | None = None
    role_id: str | None = None
    secret_id_file: Path | None = None
    approle_mount: str = "approle"
    kubernetes_role: str | None = None
    kubernetes_jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kubernetes_mount: str = "kubernetes"


@dataclass(frozen=True)
class ServerConfig:
    address: str
    port: int
    data_dir: Path
    log_level: str
    grace_seconds: float
    max_workers: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    insecure_allow_plaintext: bool = False
    principals_file: Path | None = None
    audit_log: str = "-"
    rate_limit: float = 200.0
    auth_failure_burst: int = 10
    auth_failure_refill_seconds: float = 3.0
    store: str = "file"
    vault: VaultOptions | None = None
    cache_ttl: float = 5.0
    cache_stale_window: float = 300.0
    registry_ca_file: Path | None = None
    kubeconfig: str | None = None
    kube_context: str | None = None
    k8s_sync_interval: float = 60.0
    k8s_service_account_wait: float = 10.0

    @property
    def principals_path(self) -> Path:
        return self.principals_file or self.data_dir / "principals.json"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--address",
        default=env("CREDBROKER_ADDRESS", DEFAULT_ADDRESS),
        help="address to listen on (env CREDBROKER_ADDRESS, default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env("CREDBROKER_PORT", str(DEFAULT_PORT)),
        help="port to listen on, 0 for any free port (env CREDBROKER_PORT, default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=env("CREDBROKER_LOG_LEVEL", "INFO"),
        help="log level (env CREDBROKER_LOG_LEVEL, default %(default)s)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=env("CREDBROKER_GRACE_SECONDS", "10"),
        help="seconds in-flight calls may take to finish on shutdown "
        "(env CREDBROKER_GRACE_SECONDS, default %(default)s)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=env("CREDBROKER_MAX_WORKERS", "16"),
        help="threads serving calls (env CREDBROKER_MAX_WORKERS, default %(default)s)",
    )

    security = parser.add_argument_group("security")
    security.add_argument(
        "--tls-cert",
        type=Path,
        default=env_path("CREDBROKER_TLS_CERT"),
        help="server certificate chain, PEM (env CREDBROKER_TLS_CERT); re-read when it changes",
    )
    security.add_argument(
        "--tls-key",
        type=Path,
        default=env_path("CREDBROKER_TLS_KEY"),
        help="server private key, PEM (env CREDBROKER_TLS_KEY)",
    )
    security.add_argument(
        "--client-ca",
        type=Path,
        default=env_path("CREDBROKER_CLIENT_CA"),
        help="CA for client certificates: requires mutual TLS (env CREDBROKER_CLIENT_CA)",
    )
    security.add_argument(
        "--insecure-allow-plaintext",
        action="store_true",
        default=env("CREDBROKER_INSECURE_ALLOW_PLAINTEXT", "") in ("1", "true", "yes"),
        help="serve without TLS on a non-loopback address (INSECURE: tokens travel in clear)",
    )
    security.add_argument(
        "--principals-file",
        type=Path,
        default=env_path("CREDBROKER_PRINCIPALS_FILE"),
        help="principals and token hashes (env CREDBROKER_PRINCIPALS_FILE, "
        "default DATA_DIR/principals.json)",
    )
    security.add_argument(
        "--audit-log",
        default=env("CREDBROKER_AUDIT_LOG", "-"),
        help="append audit JSON lines to this file, '-' for stderr (env CREDBROKER_AUDIT_LOG)",
    )
    security.add_argument(
        "--rate-limit",
        type=float,
        default=env("CREDBROKER_RATE_LIMIT", "200"),
        help="calls per second per principal, bursts of twice that "
        "(env CREDBROKER_RATE_LIMIT, default %(default)s)",
    )
    security.add_argument(
        "--auth-failure-burst",
        type=int,
        default=env("CREDBROKER_AUTH_FAILURE_BURST", "10"),
        help="failed authentications an address may make before it must wait "
        "(env CREDBROKER_AUTH_FAILURE_BURST, default %(default)s)",
    )
    security.add_argument(
        "--auth-failure-refill-seconds",
        type=float,
        default=env("CREDBROKER_AUTH_FAILURE_REFILL_SECONDS", "3"),
        help="seconds until an address may fail once more "
        "(env CREDBROKER_AUTH_FAILURE_REFILL_SECONDS, default %(default)s)",
    )

    add_storage_arguments(parser)
    engines = parser.add_argument_group(
        "engines (the Docker engine comes from DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH)"
    )
    engines.add_argument(
        "--registry-ca-file",
        type=Path,
        default=env_path("CREDBROKER_REGISTRY_CA_FILE"),
        help="extra CA bundle trusted when testing registry connections "
        "(env CREDBROKER_REGISTRY_CA_FILE; default: the system's)",
    )
    add_kubernetes_arguments(parser)


def seconds_type(most: float, *, zero_allowed: bool) -> Callable[[str], float]:
    """An argparse `type` for a number of seconds up to `most` (0 only if allowed)."""
    rule = (
        f"must be from 0 to {most:g} seconds"
        if zero_allowed
        else f"must be more than 0 and at most {most:g} seconds"
    )

    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
        if not (seconds >= 0 if zero_allowed else seconds > 0) or seconds > most:
            raise argparse.ArgumentTypeError(rule)
        return seconds

    return parse


_seconds = seconds_type(86400, zero_allowed=True)


def add_kubernetes_arguments(parser: argparse.ArgumentParser) -> None:
    """Cluster access for pull secrets (see broker/engines/kubernetes_engine.py)."""
    env = os.environ.get
    kubernetes = parser.add_argument_group(
        "kubernetes (pull secrets; in a pod, the service account is used when no "
        "kubeconfig is given)"
    )
    kubernetes.add_argument(
        "--kubeconfig",
        default=env("KUBECONFIG") or None,
        help="kubeconfig file(s) of the cluster for pull secrets (env KUBECONFIG; "
        "~/.kube/config is not read unless named)",
    )
    kubernetes.add_argument(
        "--kube-context",
        default=env("CREDBROKER_KUBE_CONTEXT") or None,
        help="context of the kubeconfig (env CREDBROKER_KUBE_CONTEXT; default: its current one)",
    )
    kubernetes.add_argument(
        "--k8s-sync-interval",
        type=_seconds,
        default=env("CREDBROKER_K8S_SYNC_INTERVAL", "60"),
        help="seconds between syncs of the managed pull secrets, 0 for none but those after "
        "a credential change (env CREDBROKER_K8S_SYNC_INTERVAL, default %(default)s)",
    )
    kubernetes.add_argument(
        "--k8s-service-account-wait",
        type=_seconds,
        default=env("CREDBROKER_K8S_SERVICE_ACCOUNT_WAIT", "10"),
        help="seconds to wait for the default service account of a new namespace "
        "(env CREDBROKER_K8S_SERVICE_ACCOUNT_WAIT, default %(default)s)",
    )


def add_storage_arguments(parser: argparse.ArgumentParser, *, choose_store: bool = True) -> None:
    """Where the data lives: for `serve`, and for `store migrate` (which names both ends)."""
    env = os.environ.get
    storage = parser.add_argument_group("storage")
    storage.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env("CREDBROKER_DATA_DIR", str(default_data_dir()))),
        help="directory of the embedded store, the principals and the admin token "
        "(env CREDBROKER_DATA_DIR, default %(default)s)",
    )
    if choose_store:
        storage.add_argument(
            "--store",
            choices=["file", "vault"],
            default=env("CREDBROKER_STORE", "file"),
            help="where image hosts live: the embedded encrypted file, or Vault KV v2 "
            "(env CREDBROKER_STORE, default %(default)s)",
        )
    storage.add_argument(
        "--cache-ttl",
        type=float,
        default=env("CREDBROKER_CACHE_TTL", "5"),
        help="seconds a cached read is fresh; another replica's change shows within it "
        "(env CREDBROKER_CACHE_TTL, default %(default)s)",
    )
    storage.add_argument(
        "--cache-stale-window",
        type=float,
        default=env("CREDBROKER_CACHE_STALE_WINDOW", "300"),
        help="seconds cached reads are still served while the store is unreachable "
        "(env CREDBROKER_CACHE_STALE_WINDOW, default %(default)s)",
    )
    vault = parser.add_argument_group(
        "vault (with --store vault; VAULT_TOKEN is read from the environment)"
    )
    vault.add_argument("--vault-addr", default=env("VAULT_ADDR", ""), help="env VAULT_ADDR")
    vault.add_argument(
        "--vault-mount",
        default=env("CREDBROKER_VAULT_MOUNT", "secret"),
        help="KV v2 mount (env CREDBROKER_VAULT_MOUNT, default %(default)s)",
    )
    vault.add_argument(
        "--vault-prefix",
        default=env("CREDBROKER_VAULT_PREFIX", "credbroker"),
        help="path prefix inside the mount (env CREDBROKER_VAULT_PREFIX, default %(default)s)",
    )
    vault.add_argument(
        "--vault-namespace",
        default=env("VAULT_NAMESPACE", ""),
        help="Enterprise namespace (env VAULT_NAMESPACE)",
    )
    vault.add_argument(
        "--vault-cacert", type=Path, default=env_path("VAULT_CACERT"), help="env VAULT_CACERT"
    )
    vault.add_argument(
        "--vault-client-cert",
        type=Path,
        default=env_path("VAULT_CLIENT_CERT"),
        help="env VAULT_CLIENT_CERT",
    )
    vault.add_argument(
        "--vault-client-key",
        type=Path,
        default=env_path("VAULT_CLIENT_KEY"),
        help="env VAULT_CLIENT_KEY",
    )
    vault.add_argument(
        "--vault-auth",
        choices=["token", "approle", "kubernetes"],
        default=env("CREDBROKER_VAULT_AUTH", "token"),
        help="how to log in (env CREDBROKER_VAULT_AUTH, default %(default)s)",
    )
    vault.add_argument(
        "--vault-token-file",
        type=Path,
        default=env_path("CREDBROKER_VAULT_TOKEN_FILE"),
        help="token file re-read when Vault rejects the token, e.g. a Vault Agent sink "
        "(env CREDBROKER_VAULT_TOKEN_FILE; else VAULT_TOKEN)",
    )
    vault.add_argument(
        "--vault-role-id", default=env("CREDBROKER_VAULT_ROLE_ID", ""), help="AppRole role id"
    )
    vault.add_argument(
        "--vault-secret-id-file",
        type=Path,
        default=env_path("CREDBROKER_VAULT_SECRET_ID_FILE"),
        help="file holding the AppRole secret id",
    )
    vault.add_argument(
        "--vault-approle-mount", default=env("CREDBROKER_VAULT_APPROLE_MOUNT", "approle")
    )
    vault.add_argument(
        "--vault-k8s-role",
        default=env("CREDBROKER_VAULT_K8S_ROLE", ""),
        help="Kubernetes auth role",
    )
    vault.add_argument(
        "--vault-k8s-jwt-file",
        type=Path,
        default=env(
            "CREDBROKER_VAULT_K8S_JWT_FILE", "/var/run/secrets/kubernetes.io/serviceaccount/token"
        ),
    )
    vault.add_argument("--vault-k8s-mount", default=env("CREDBROKER_VAULT_K8S_MOUNT", "kubernetes"))


def vault_options_from(args: argparse.Namespace) -> VaultOptions | None:
    if getattr(args, "store", "vault") != "vault":
        return None
    return VaultOptions(
        url=args.vault_addr,
        mount=args.vault_mount,
        prefix=args.vault_prefix,
        namespace=args.vault_namespace or None,
        ca_file=args.vault_cacert,
        client_cert=args.vault_client_cert,
        client_key=args.vault_client_key,
        auth=args.vault_auth,
        token_file=args.vault_token_file,
        role_id=args.vault_role_id or None,
        secret_id_file=args.vault_secret_id_file,
        approle_mount=args.vault_approle_mount,
        kubernetes_role=args.vault_k8s_role or None,
        kubernetes_jwt_file=args.vault_k8s_jwt_file,
        kubernetes_mount=args.vault_k8s_mount,
    )


def server_config_from(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        address=args.address,
        port=args.port,
        data_dir=args.data_dir,
        log_level=args.log_level,
        grace_seconds=args.grace_seconds,
        max_workers=args.max_workers,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        client_ca=args.client_ca,
        insecure_allow_plaintext=args.insecure_allow_plaintext,
        principals_file=args.principals_file,
        audit_log=args.audit_log,
        rate_limit=args.rate_limit,
        auth_failure_burst=args.auth_failure_burst,
        auth_failure_refill_seconds=args.auth_failure_refill_seconds,
        store=args.store,
        vault=vault_options_from(args),
        cache_ttl=args.cache_ttl,
        cache_stale_window=args.cache_stale_window,
        registry_ca_file=args.registry_ca_file,
        kubeconfig=args.kubeconfig,
        kube_context=args.kube_context,
        k8s_sync_interval=args.k8s_sync_interval,
        k8s_service_account_wait=args.k8s_service_account_wait,
    )
