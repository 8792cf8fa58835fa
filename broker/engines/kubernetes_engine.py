"""The Kubernetes API through the official client (the only importer of the kubernetes SDK).

Cluster access (`open_cluster`), in this order:
1. a kubeconfig: `--kubeconfig` or `KUBECONFIG` (a list of files separated by
   ':' is merged as kubectl does), with `--kube-context` or its current
   context. The file is never written back (`persist_config=False`);
2. in-cluster: when `KUBERNETES_SERVICE_HOST` is set and the pod's service
   account token exists, that token (re-read as the kubelet rotates it) and
   the cluster CA;
3. otherwise no cluster: the PullSecretService answers FAILED_PRECONDITION
   (KUBERNETES_NOT_CONFIGURED). `~/.kube/config` is not picked up on its own:
   a credential broker should not start acting on whatever cluster a
   developer's shell happens to point at; name it with `--kubeconfig`.
A kubeconfig or in-cluster setup that is named but cannot be loaded stops the
broker at startup (`ClusterConfigError`).

Requests: objects are read and written as raw JSON (`_preload_content=False`)
so that a read + write never drops a field the client's models do not know;
patches are always `application/json-patch+json` (the content type is given
explicitly, never left to the client's guess). Each request has a connect and
a read timeout; urllib3 retries a refused connection once, nothing else.

Errors become broker errors here and only here (see `broker.core.cluster` for
the table): the API server's `Status.message` is kept as the message, the
HTTP status and the Status reason go to the ErrorInfo metadata. Request and
response bodies are never logged or put in a message: secret data travels in
them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import urllib3
import urllib3.exceptions
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException, OpenApiException
from kubernetes.config.config_exception import ConfigException

from broker.core.cluster import (
    JSON_PATCH,
    KUBERNETES_ALREADY_EXISTS,
    KUBERNETES_CONFLICT,
    KUBERNETES_ERROR,
    KUBERNETES_FORBIDDEN,
    KUBERNETES_INVALID,
    KUBERNETES_NOT_FOUND,
    KUBERNETES_THROTTLED,
    KUBERNETES_UNAUTHORIZED,
    KUBERNETES_UNREACHABLE,
    KubeObject,
)
from broker.core.errors import (
    Aborted,
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

#: (connect, read) seconds of every request.
DEFAULT_TIMEOUT = (5.0, 20.0)
#: Longest API server message kept (a Status message is a sentence or two).
MAX_MESSAGE = 2000
_SERVICE_HOST = "KUBERNETES_SERVICE_HOST"
_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class ClusterConfigError(Exception):
    """A cluster was named but its configuration cannot be loaded; says what to fix."""


@dataclass(frozen=True)
class ClusterSettings:
    #: A kubeconfig path, or several separated by os.pathsep (as in KUBECONFIG).
    kubeconfig: str | None = None
    context: str | None = None
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    #: The environment to look at for in-cluster settings.
    environ: Mapping[str, str] | None = None
    token_file: Path = _TOKEN_FILE


def open_cluster(settings: ClusterSettings) -> KubernetesCluster | None:
    """The configured cluster, None when none is configured (see the module docstring)."""
    environ = os.environ if settings.environ is None else settings.environ
    configuration = k8s_client.Configuration()
    if settings.kubeconfig:
        paths = [p for p in settings.kubeconfig.split(os.pathsep) if p]
        missing = [p for p in paths if not Path(p).expanduser().is_file()]
        if missing:
            raise ClusterConfigError(f"the kubeconfig {missing[0]} does not exist")
        try:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=settings.kubeconfig,
                context=settings.context or None,
                client_configuration=configuration,
                persist_config=False,
            )
        except (ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
            raise ClusterConfigError(
                f"cannot use the kubeconfig {settings.kubeconfig}: {_config_words(exc)}"
            ) from None
    elif environ.get(_SERVICE_HOST):
        if settings.context:
            raise ClusterConfigError("--kube-context needs a kubeconfig (--kubeconfig)")
        if not settings.token_file.is_file():
            return None  # a pod without a service account token: no cluster access
        try:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except (ConfigException, OSError) as exc:
            raise ClusterConfigError(
                f"cannot use the in-cluster service account: {_config_words(exc)}"
            ) from None
    else:
        if settings.context:
            raise ClusterConfigError("--kube-context needs a kubeconfig (--kubeconfig)")
        return None
    configuration.retries = urllib3.Retry(
        total=1, connect=1, read=0, redirect=0, status=0, other=0, raise_on_status=False
    )
    configuration.connection_pool_maxsize = 32
    return KubernetesCluster(k8s_client.ApiClient(configuration), settings.timeout)


def _config_words(exc: Exception) -> str:
    # Config errors name files and fields, not credentials; keep them short anyway.
    text = str(exc).strip() or type(exc).__name__
    return text[:300]


class KubernetesCluster:
    """`broker.core.cluster.Cluster` on the official client."""

    def __init__(self, api_client: Any, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        self._api_client = api_client
        self._core = k8s_client.CoreV1Api(api_client)
        self._timeout = timeout

    @property
    def server(self) -> str:
        return str(self._api_client.configuration.host)

    def close(self) -> None:
        self._api_client.close()

    # -- namespaces ---------------------------------------------------------------

    def get_namespace(self, name: str) -> KubeObject | None:
        return self._get(lambda **kw: self._core.read_namespace(name, **kw))

    def list_namespaces(self, label_selector: str) -> list[KubeObject]:
        return self._list(
            lambda **kw: self._core.list_namespace(label_selector=label_selector, **kw)
        )

    # -- secrets -------------------------------------------------------------------

    def get_secret(self, namespace: str, name: str) -> KubeObject | None:
        return self._get(lambda **kw: self._core.read_namespaced_secret(name, namespace, **kw))

    def create_secret(self, namespace: str, body: KubeObject) -> KubeObject:
        # The client validates a plain dict into its V1Secret model (the broker's own,
        # fully known fields) before it serialises it.
        secret = cast(Any, body)
        return self._call(lambda **kw: self._core.create_namespaced_secret(namespace, secret, **kw))

    def patch_secret(self, namespace: str, name: str, patch: list[KubeObject]) -> KubeObject:
        return self._call(
            lambda **kw: self._core.patch_namespaced_secret(
                name, namespace, patch, _content_type=JSON_PATCH, **kw
            )
        )

    def delete_secret(self, namespace: str, name: str, resource_version: str) -> None:
        options = k8s_client.V1DeleteOptions(
            preconditions=k8s_client.V1Preconditions(resource_version=resource_version)
        )
        self._call(
            lambda **kw: self._core.delete_namespaced_secret(name, namespace, body=options, **kw)
        )

    # -- service accounts ------------------------------------------------------------

    def get_service_account(self, namespace: str, name: str) -> KubeObject | None:
        return self._get(
            lambda **kw: self._core.read_namespaced_service_account(name, namespace, **kw)
        )

    def list_service_accounts(self, namespace: str) -> list[KubeObject]:
        return self._list(lambda **kw: self._core.list_namespaced_service_account(namespace, **kw))

    def patch_service_account(
        self, namespace: str, name: str, patch: list[KubeObject]
    ) -> KubeObject:
        return self._call(
            lambda **kw: self._core.patch_namespaced_service_account(
                name, namespace, patch, _content_type=JSON_PATCH, **kw
            )
        )

    # -- plumbing ----------------------------------------------------------------------

    def _get(self, request: Callable[..., Any]) -> KubeObject | None:
        try:
            return self._call(request)
        except NotFound as exc:
            if exc.reason == KUBERNETES_NOT_FOUND:
                return None
            raise

    def _list(self, request: Callable[..., Any]) -> list[KubeObject]:
        answer = self._call(request)
        items = answer.get("items")
        return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []

    def _call(self, request: Callable[..., Any]) -> KubeObject:
        try:
            response = request(_preload_content=False, _request_timeout=self._timeout)
        except ApiException as exc:
            raise api_error(exc.status, exc.body) from None
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(
                f"cannot reach the Kubernetes API server at {self.server}: {_network_words(exc)}",
                reason=KUBERNETES_UNREACHABLE,
            ) from None
        except OpenApiException as exc:  # the client refused its own arguments
            raise FailedPrecondition(
                f"the Kubernetes client refused the request ({type(exc).__name__})",
                reason=KUBERNETES_ERROR,
            ) from None
        try:
            raw = response.data
        finally:
            response.release_conn()
        if not raw:
            return {}
        try:
            decoded = json.loads(raw)
        except ValueError:
            raise Unavailable(
                f"the Kubernetes API server at {self.server} answered something that is not JSON",
                reason=KUBERNETES_ERROR,
            ) from None
        return decoded if isinstance(decoded, dict) else {}


def _network_words(exc: urllib3.exceptions.HTTPError) -> str:
    """What went wrong on the wire, without URLs' query strings or bodies."""
    cause: BaseException = exc
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        cause = exc.reason
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        return "connection refused or no route to the host"
    if isinstance(cause, urllib3.exceptions.ConnectTimeoutError):
        return "connection timed out"
    if isinstance(cause, urllib3.exceptions.ReadTimeoutError):
        return "no answer in time"
    if isinstance(cause, urllib3.exceptions.SSLError):
        return "the TLS handshake failed (check the cluster CA in the kubeconfig)"
    if isinstance(cause, urllib3.exceptions.ProtocolError):
        return "the connection broke"
    return type(cause).__name__


def api_error(status: int | None, body: str | bytes | None) -> BrokerError:
    """The broker error for an API server's non-2xx answer (its Status object)."""
    code = int(status or 0)
    status_object: dict[str, Any] = {}
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            status_object = parsed
    message = str(status_object.get("message") or "").strip()[:MAX_MESSAGE]
    reason = str(status_object.get("reason") or "")
    if not message:
        message = f"the Kubernetes API server answered HTTP {code}"
    metadata = {"http_status": str(code)}
    if reason:
        metadata["kubernetes_reason"] = reason[:100]
    if code == 401:
        return FailedPrecondition(
            f"the Kubernetes API server did not accept the broker's credentials: {message}",
            reason=KUBERNETES_UNAUTHORIZED,
            metadata=metadata,
        )
    if code == 403:
        return PermissionDenied(message, reason=KUBERNETES_FORBIDDEN, metadata=metadata)
    if code == 404:
        return NotFound(message, reason=KUBERNETES_NOT_FOUND, metadata=metadata)
    if code == 409:
        if reason == "AlreadyExists":
            return AlreadyExists(message, reason=KUBERNETES_ALREADY_EXISTS, metadata=metadata)
        return Aborted(message, reason=KUBERNETES_CONFLICT, metadata=metadata)
    if code in (400, 422):
        return FailedPrecondition(message, reason=KUBERNETES_INVALID, metadata=metadata)
    if code == 429:
        return ResourceExhausted(message, reason=KUBERNETES_THROTTLED, metadata=metadata)
    return Unavailable(message, reason=KUBERNETES_ERROR, metadata=metadata)
