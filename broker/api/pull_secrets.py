"""PullSecretService: validate the request, call the pull-secret manager, convert the result.

Per-namespace errors are domain errors too: each becomes a NamespaceError with
the status code name the one mapping in `broker.api.errors` gives it, its
ErrorInfo-style reason and its message (the API server's words).
"""

from __future__ import annotations

import grpc
from google.rpc import code_pb2

from broker.api.context import actor_of
from broker.api.errors import code_of
from broker.core.errors import BrokerError
from broker.core.image_hosts import RESOURCE_PREFIX
from broker.core.pull_secrets import (
    AccountChange,
    AccountOutcome,
    ListedSecret,
    NamespaceOutcome,
    ProvisionRequest,
    PullSecretManager,
    RevokeRequest,
    SecretChange,
    SecretState,
)
from broker.v1 import pull_secrets_pb2 as pb
from broker.v1 import pull_secrets_pb2_grpc

_SECRET_CHANGES = {
    SecretChange.CREATED: pb.SECRET_CHANGE_CREATED,
    SecretChange.UPDATED: pb.SECRET_CHANGE_UPDATED,
    SecretChange.UNCHANGED: pb.SECRET_CHANGE_UNCHANGED,
    SecretChange.DELETED: pb.SECRET_CHANGE_DELETED,
    SecretChange.ABSENT: pb.SECRET_CHANGE_ABSENT,
}
_ACCOUNT_CHANGES = {
    AccountChange.PATCHED: pb.SERVICE_ACCOUNT_CHANGE_PATCHED,
    AccountChange.UNCHANGED: pb.SERVICE_ACCOUNT_CHANGE_UNCHANGED,
    AccountChange.NOT_FOUND: pb.SERVICE_ACCOUNT_CHANGE_NOT_FOUND,
    AccountChange.FAILED: pb.SERVICE_ACCOUNT_CHANGE_FAILED,
}
_STATES = {
    SecretState.CURRENT: pb.PULL_SECRET_STATE_CURRENT,
    SecretState.STALE: pb.PULL_SECRET_STATE_STALE,
    SecretState.MISSING: pb.PULL_SECRET_STATE_MISSING,
    SecretState.FOREIGN: pb.PULL_SECRET_STATE_FOREIGN,
    SecretState.UNKNOWN: pb.PULL_SECRET_STATE_UNSPECIFIED,
}


def namespace_error(error: BrokerError | None) -> pb.NamespaceError | None:
    if error is None:
        return None
    return pb.NamespaceError(
        code=code_pb2.Code.Name(code_of(error)), reason=error.reason, message=error.message
    )


def _account(outcome: AccountOutcome) -> pb.ServiceAccountResult:
    return pb.ServiceAccountResult(
        name=outcome.name,
        change=_ACCOUNT_CHANGES[outcome.change],
        error=namespace_error(outcome.error),
    )


def namespace_result(outcome: NamespaceOutcome) -> pb.NamespaceResult:
    return pb.NamespaceResult(
        namespace=outcome.namespace,
        secret_name=outcome.secret_name,
        secret_change=(
            _SECRET_CHANGES[outcome.secret_change]
            if outcome.secret_change is not None
            else pb.SECRET_CHANGE_UNSPECIFIED
        ),
        service_accounts=[_account(a) for a in outcome.service_accounts],
        image_hosts=[RESOURCE_PREFIX + i for i in outcome.image_hosts],
        error=namespace_error(outcome.error),
    )


def pull_secret(listed: ListedSecret) -> pb.PullSecret:
    return pb.PullSecret(
        namespace=listed.namespace,
        secret_name=listed.secret_name,
        image_hosts=[RESOURCE_PREFIX + i for i in listed.image_hosts],
        keep_in_sync=listed.keep_in_sync,
        state=_STATES[listed.state],
        current=listed.state == SecretState.CURRENT,
        content_sha256=listed.content_sha256,
        service_accounts=list(listed.service_accounts),
        error=namespace_error(listed.error),
    )


class PullSecretServicer(pull_secrets_pb2_grpc.PullSecretServiceServicer):
    def __init__(self, manager: PullSecretManager) -> None:
        self._manager = manager

    def ProvisionPullSecret(
        self, request: pb.ProvisionPullSecretRequest, context: grpc.ServicerContext
    ) -> pb.ProvisionPullSecretResponse:
        outcome = self._manager.provision(
            ProvisionRequest(
                namespaces=list(request.namespaces),
                namespace_selector=request.namespace_selector,
                image_hosts=list(request.image_hosts),
                images=list(request.images),
                secret_name=request.secret_name,
                service_accounts=list(request.service_accounts),
                dry_run=request.dry_run,
                keep_in_sync=request.keep_in_sync,
            ),
            actor_of(context),
        )
        return pb.ProvisionPullSecretResponse(
            results=[namespace_result(r) for r in outcome.results],
            image_hosts=[RESOURCE_PREFIX + i for i in outcome.image_hosts],
            dry_run=outcome.dry_run,
        )

    def RevokePullSecret(
        self, request: pb.RevokePullSecretRequest, context: grpc.ServicerContext
    ) -> pb.RevokePullSecretResponse:
        results = self._manager.revoke(
            RevokeRequest(
                namespaces=list(request.namespaces),
                namespace_selector=request.namespace_selector,
                secret_name=request.secret_name,
                dry_run=request.dry_run,
            ),
            actor_of(context),
        )
        return pb.RevokePullSecretResponse(
            results=[namespace_result(r) for r in results], dry_run=request.dry_run
        )

    def ListPullSecrets(
        self, request: pb.ListPullSecretsRequest, context: grpc.ServicerContext
    ) -> pb.ListPullSecretsResponse:
        page = self._manager.list_page(
            request.namespace, request.page_size, request.page_token, actor_of(context)
        )
        return pb.ListPullSecretsResponse(
            pull_secrets=[pull_secret(s) for s in page.secrets],
            next_page_token=page.next_page_token,
        )

    def SyncPullSecrets(
        self, request: pb.SyncPullSecretsRequest, context: grpc.ServicerContext
    ) -> pb.SyncPullSecretsResponse:
        results = self._manager.sync(actor_of(context), dry_run=request.dry_run)
        return pb.SyncPullSecretsResponse(
            results=[namespace_result(r) for r in results], dry_run=request.dry_run
        )
