"""The Kubernetes adapter without a cluster: which settings mean which cluster, and how the
API server's Status answers become broker errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from broker.engines.kubernetes_engine import (
    ClusterConfigError,
    ClusterSettings,
    api_error,
    open_cluster,
)


def _status(code: int, reason: str, message: str) -> str:
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
    )


FORBIDDEN = (
    'secrets "x" is forbidden: User "system:serviceaccount:ns:sa" cannot get resource '
    '"secrets" in API group "" in the namespace "ns"'
)


@pytest.mark.parametrize(
    ("code", "reason", "kind", "broker_reason"),
    [
        (401, "Unauthorized", FailedPrecondition, "KUBERNETES_UNAUTHORIZED"),
        (403, "Forbidden", PermissionDenied, "KUBERNETES_FORBIDDEN"),
        (404, "NotFound", NotFound, "KUBERNETES_NOT_FOUND"),
        (409, "AlreadyExists", AlreadyExists, "KUBERNETES_ALREADY_EXISTS"),
        (409, "Conflict", Aborted, "KUBERNETES_CONFLICT"),
        (422, "Invalid", FailedPrecondition, "KUBERNETES_INVALID"),
        (400, "BadRequest", FailedPrecondition, "KUBERNETES_INVALID"),
        (429, "TooManyRequests", ResourceExhausted, "KUBERNETES_THROTTLED"),
        (500, "InternalError", Unavailable, "KUBERNETES_ERROR"),
        (503, "ServiceUnavailable", Unavailable, "KUBERNETES_ERROR"),
    ],
)
def test_api_errors_keep_the_api_servers_words(
    code: int, reason: str, kind: type[Exception], broker_reason: str
) -> None:
    error = api_error(code, _status(code, reason, FORBIDDEN))
    assert isinstance(error, kind)
    assert error.reason == broker_reason
    assert FORBIDDEN in error.message
    assert error.metadata == {"http_status": str(code), "kubernetes_reason": reason}


def test_an_answer_that_is_not_a_status_still_maps() -> None:
    error = api_error(502, "<html>bad gateway</html>")
    assert isinstance(error, Unavailable)
    assert error.message == "the Kubernetes API server answered HTTP 502"
    assert "html" not in error.message


def test_no_kubeconfig_and_not_in_a_pod_is_no_cluster() -> None:
    assert open_cluster(ClusterSettings(environ={})) is None


def test_a_pod_without_a_token_is_no_cluster(tmp_path: Path) -> None:
    settings = ClusterSettings(
        environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
        token_file=tmp_path / "absent",
    )
    assert open_cluster(settings) is None


def test_a_named_but_unusable_configuration_stops_the_broker(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="does not exist"):
        open_cluster(ClusterSettings(kubeconfig=str(tmp_path / "missing"), environ={}))
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\ncontexts: []\n")
    with pytest.raises(ClusterConfigError, match="cannot use the kubeconfig"):
        open_cluster(ClusterSettings(kubeconfig=str(broken), environ={}))
    with pytest.raises(ClusterConfigError, match="--kube-context needs a kubeconfig"):
        open_cluster(ClusterSettings(context="prod", environ={}))


def test_a_kubeconfig_names_its_server(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t0k"}}],
                "contexts": [
                    {"name": "one", "context": {"cluster": "c", "user": "u"}},
                    {"name": "two", "context": {"cluster": "c", "user": "u"}},
                ],
                "current-context": "one",
            }
        )
    )
    cluster = open_cluster(ClusterSettings(kubeconfig=str(config), context="two", environ={}))
    assert cluster is not None
    try:
        assert cluster.server == "https://127.0.0.1:6443"
    finally:
        cluster.close()
    with pytest.raises(ClusterConfigError):
        open_cluster(ClusterSettings(kubeconfig=str(config), context="three", environ={}))
