"""Helpers for tests that run the broker on Vault (tests/integration/test_vault_store.py).

Everything works against the emulator and, where it only needs a root token
(policies, tokens), against a real Vault too (VAULT_ADDR/VAULT_TOKEN, see
tests/support/vault_target.py). Token values are never printed or logged.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import hvac
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.core.audit import SYSTEM_ACTOR, discard_audit
from broker.core.image_hosts import HostFields, ImageHostCatalog
from broker.core.secrets import Secret
from broker.stores.vault import TokenAuth, VaultSettings, VaultStore
from tests.support.broker_process import BrokerProcess
from tests.support.vault_target import VaultTarget

STORE_HEALTH = "credbroker.SecretStore"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_T = TypeVar("_T")

_BLOCK = re.compile(r'path\s+"(?P<path>[^"]+)"\s*\{\s*capabilities\s*=\s*\[(?P<caps>[^\]]*)\]\s*\}')


def policy_without(hcl: str, kind: str, capability: str) -> str:
    """`hcl` with `capability` removed from every rule on the KV v2 `kind` paths.

    `kind` is the second path segment: "data", "metadata" or "delete"
    (`secret/<kind>/<prefix>...`). A rule left without capabilities is dropped.
    Fails when nothing was removed (the test would prove nothing).
    """
    removed = 0

    def edit(match: re.Match[str]) -> str:
        nonlocal removed
        segments = match["path"].split("/")
        caps = re.findall(r'"([a-z]+)"', match["caps"])
        if len(segments) < 2 or segments[1] != kind or capability not in caps:
            return match[0]
        removed += 1
        kept = [c for c in caps if c != capability]
        if not kept:
            return ""
        listed = ", ".join(f'"{c}"' for c in kept)
        return f'path "{match["path"]}" {{\n  capabilities = [{listed}]\n}}'

    edited = _BLOCK.sub(edit, hcl)
    if removed == 0:
        raise AssertionError(f"the policy grants no {capability!r} on {kind}/ paths")
    return edited


def token_with_policy(
    vault: VaultTarget,
    name: str,
    hcl: str,
    *,
    ttl: float = 3600.0,
    renewable: bool = True,
) -> str:
    """Install policy `name` and return a token holding only it (plus Vault's default).

    The emulator is told directly; a real Vault gets it over HTTP with the root
    token the test run was given.
    """
    if vault.emulator is not None:
        vault.emulator.put_policy(name, hcl)
        return vault.emulator.create_token(policies=[name], ttl=ttl, renewable=renewable)
    client = hvac.Client(url=vault.url, token=vault.token)
    try:
        client.sys.create_or_update_policy(name=name, policy=hcl)
        answer = client.auth.token.create(policies=[name], ttl=f"{int(ttl)}s", renewable=renewable)
        return str(answer["auth"]["client_token"])
    finally:
        client.adapter.close()


def full_token(vault: VaultTarget, prefix: str, *, ttl: float = 3600.0) -> str:
    """A token with exactly the shipped policy (deploy/vault/credbroker.hcl) moved to `prefix`."""
    return token_with_policy(vault, prefix, vault.policy_for_prefix(prefix), ttl=ttl)


def token_store(vault: VaultTarget, prefix: str, token: str) -> VaultStore:
    return VaultStore(
        VaultSettings(url=vault.url, auth=TokenAuth(token=token), mount=vault.mount, prefix=prefix)
    )


def seed(vault: VaultTarget, prefix: str, hosts: Sequence[tuple[str, str, str, str]]) -> None:
    """Fill `prefix` as a broker would: Docker Hub as the default, then `hosts`.

    Each host is (id, url, username, access token). Runs in this process with
    the full shipped policy, so that a broker with less can start on it.
    """
    store = token_store(vault, prefix, full_token(vault, prefix))
    try:
        catalog = ImageHostCatalog(store, discard_audit)
        assert catalog.ensure_seeded()
        for host_id, url, username, access_token in hosts:
            fields = HostFields(url=url, username=username, access_token=Secret(access_token))
            catalog.create(host_id, fields, SYSTEM_ACTOR)
    finally:
        store.close()


def vault_broker(
    data_dir: Path,
    vault: VaultTarget,
    prefix: str,
    *,
    token: str | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> BrokerProcess:
    """A broker process (not started) on the Vault store under `prefix`."""
    environment = {"VAULT_ADDR": vault.url, **(env or {})}
    if token is not None:
        environment["VAULT_TOKEN"] = token
    return BrokerProcess(
        data_dir,
        args=["--store", "vault", "--vault-mount", vault.mount, "--vault-prefix", prefix, *args],
        env=environment,
    )


def health(broker: BrokerProcess, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(broker.channel())
    answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(answer.status)


def wait_until(
    probe: Callable[[], _T], accept: Callable[[_T], bool], *, timeout: float, interval: float = 0.1
) -> _T:
    """Call `probe` until `accept(result)` or `timeout` seconds passed; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if accept(result) or time.monotonic() >= deadline:
            return result
        time.sleep(interval)
