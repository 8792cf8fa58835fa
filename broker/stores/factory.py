"""Opens the configured store: the embedded file, or Vault."""

from __future__ import annotations

import os

from broker.config import ServerConfig, VaultOptions
from broker.stores.base import SecretStore, StoreError
from broker.stores.file import FileStore
from broker.stores.vault import (
    AppRoleAuth,
    KubernetesAuth,
    TokenAuth,
    VaultAuth,
    VaultSettings,
    VaultStore,
)


class StoreConfigError(StoreError):
    """The store settings are incomplete; the message says which one is missing."""


def vault_settings(options: VaultOptions) -> VaultSettings:
    if not options.url:
        raise StoreConfigError("the Vault store needs VAULT_ADDR (or --vault-addr)")
    auth: VaultAuth
    if options.auth == "approle":
        if not options.role_id or options.secret_id_file is None:
            raise StoreConfigError(
                "AppRole login needs --vault-role-id and --vault-secret-id-file "
                "(CREDBROKER_VAULT_ROLE_ID, CREDBROKER_VAULT_SECRET_ID_FILE)"
            )
        auth = AppRoleAuth(options.role_id, options.secret_id_file, options.approle_mount)
    elif options.auth == "kubernetes":
        if not options.kubernetes_role:
            raise StoreConfigError(
                "Kubernetes login needs --vault-k8s-role (CREDBROKER_VAULT_K8S_ROLE)"
            )
        auth = KubernetesAuth(
            options.kubernetes_role, options.kubernetes_jwt_file, options.kubernetes_mount
        )
    else:
        token = os.environ.get("VAULT_TOKEN") or None
        if options.token_file is None and token is None:
            raise StoreConfigError(
                "token login needs VAULT_TOKEN or --vault-token-file (CREDBROKER_VAULT_TOKEN_FILE)"
            )
        auth = TokenAuth(token=token, token_file=options.token_file)
    return VaultSettings(
        url=options.url,
        auth=auth,
        mount=options.mount,
        prefix=options.prefix,
        namespace=options.namespace,
        ca_file=options.ca_file,
        client_cert=options.client_cert,
        client_key=options.client_key,
    )


def open_backend(config: ServerConfig) -> SecretStore:
    if config.store == "vault":
        if config.vault is None:
            raise StoreConfigError("the Vault store is selected but not configured")
        return VaultStore(vault_settings(config.vault))
    return FileStore(config.data_dir)
