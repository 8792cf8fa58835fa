"""What the pull-secret domain needs from a Kubernetes cluster, without the SDK.

The adapter (`broker.engines.kubernetes_engine`) implements `Cluster` with the
official client and is the only module that imports it. Objects travel as the
plain JSON the API server sends (`dict`), so that a read + write keeps every
field, also those a client library does not know.

Errors: `get_*` return None for 404; everything else the API server refuses
is raised as a BrokerError whose message is the API server's own words
(`Status.message`) and whose reason is one of the KUBERNETES_* constants
below, with `metadata` {"http_status", "kubernetes_reason"}:

| API answer                  | error class        | reason                      |
|-----------------------------|--------------------|-----------------------------|
| 401                         | FailedPrecondition | KUBERNETES_UNAUTHORIZED     |
| 403                         | PermissionDenied   | KUBERNETES_FORBIDDEN        |
| 404                         | NotFound           | KUBERNETES_NOT_FOUND        |
| 409 AlreadyExists           | AlreadyExists      | KUBERNETES_ALREADY_EXISTS   |
| 409 Conflict                | Aborted            | KUBERNETES_CONFLICT         |
| 400, 422                    | FailedPrecondition | KUBERNETES_INVALID          |
| 429                         | ResourceExhausted  | KUBERNETES_THROTTLED        |
| 5xx, other                  | Unavailable        | KUBERNETES_ERROR            |
| no answer (refused, timeout)| Unavailable        | KUBERNETES_UNREACHABLE      |
"""

from __future__ import annotations

from typing import Any, Protocol

#: A Kubernetes object as JSON.
KubeObject = dict[str, Any]

KUBERNETES_NOT_CONFIGURED = "KUBERNETES_NOT_CONFIGURED"
KUBERNETES_UNREACHABLE = "KUBERNETES_UNREACHABLE"
KUBERNETES_UNAUTHORIZED = "KUBERNETES_UNAUTHORIZED"
KUBERNETES_FORBIDDEN = "KUBERNETES_FORBIDDEN"
KUBERNETES_NOT_FOUND = "KUBERNETES_NOT_FOUND"
KUBERNETES_ALREADY_EXISTS = "KUBERNETES_ALREADY_EXISTS"
KUBERNETES_CONFLICT = "KUBERNETES_CONFLICT"
KUBERNETES_INVALID = "KUBERNETES_INVALID"
KUBERNETES_THROTTLED = "KUBERNETES_THROTTLED"
KUBERNETES_ERROR = "KUBERNETES_ERROR"

#: `Content-Type` of the only patch the broker sends (RFC 6902 JSON patch).
JSON_PATCH = "application/json-patch+json"


class Cluster(Protocol):
    """The API calls pull-secret provisioning makes. Patches are always JSON
    patches (a list of RFC 6902 operations), never merge patches."""

    @property
    def server(self) -> str:
        """The API server's URL, for messages."""
        ...

    def get_namespace(self, name: str) -> KubeObject | None: ...

    def list_namespaces(self, label_selector: str) -> list[KubeObject]: ...

    def get_secret(self, namespace: str, name: str) -> KubeObject | None: ...

    def create_secret(self, namespace: str, body: KubeObject) -> KubeObject: ...

    def patch_secret(self, namespace: str, name: str, patch: list[KubeObject]) -> KubeObject: ...

    def delete_secret(self, namespace: str, name: str, resource_version: str) -> None:
        """Delete only if the secret is still at `resource_version` (409 otherwise)."""
        ...

    def get_service_account(self, namespace: str, name: str) -> KubeObject | None: ...

    def list_service_accounts(self, namespace: str) -> list[KubeObject]: ...

    def patch_service_account(
        self, namespace: str, name: str, patch: list[KubeObject]
    ) -> KubeObject: ...
