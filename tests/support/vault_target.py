"""The Vault the tests use: the emulator, or a real Vault when VAULT_ADDR is set.

With VAULT_ADDR (and VAULT_TOKEN) set, every Vault test runs against that
server instead, each under its own random prefix of the `secret` KV v2 mount,
so that the same suite proves the emulator and real Vault agree.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker.stores.vault import TokenAuth, VaultSettings, VaultStore
from tests.support.vault_emulator import VaultEmulator

POLICY_FILE = Path(__file__).resolve().parents[2] / "deploy" / "vault" / "credbroker.hcl"
POLICY_NAME = "credbroker"


@dataclass
class VaultTarget:
    url: str
    #: A token with exactly the shipped policy (the root token on a real Vault).
    token: str
    mount: str
    emulator: VaultEmulator | None

    @property
    def real(self) -> bool:
        return self.emulator is None

    def new_prefix(self) -> str:
        return f"credbroker-test-{secrets.token_hex(4)}"

    def policy_for_prefix(self, prefix: str) -> str:
        """The shipped policy, moved to another prefix (tests isolate by prefix)."""
        return POLICY_FILE.read_text().replace("credbroker", prefix)

    def token_for_prefix(self, prefix: str, *, ttl: float = 3600.0) -> str:
        if self.emulator is None:
            return self.token
        self.emulator.put_policy(prefix, self.policy_for_prefix(prefix))
        return self.emulator.create_token(policies=[prefix], ttl=ttl)

    def store(self, prefix: str | None = None, token: str | None = None) -> VaultStore:
        prefix = prefix or self.new_prefix()
        return VaultStore(
            VaultSettings(
                url=self.url,
                auth=TokenAuth(token=token or self.token_for_prefix(prefix)),
                mount=self.mount,
                prefix=prefix,
            )
        )


def vault_target() -> Iterator[VaultTarget]:
    address = os.environ.get("VAULT_ADDR")
    if address:
        token = os.environ.get("VAULT_TOKEN", "")
        if not token:
            raise RuntimeError("VAULT_ADDR is set but VAULT_TOKEN is not: the tests need both")
        yield VaultTarget(url=address, token=token, mount="secret", emulator=None)
        return
    emulator = VaultEmulator().start()
    try:
        emulator.put_policy(POLICY_NAME, POLICY_FILE.read_text())
        yield VaultTarget(
            url=emulator.url,
            token=emulator.create_token(policies=[POLICY_NAME]),
            mount="secret",
            emulator=emulator,
        )
        assert emulator.server_errors == [], emulator.server_errors
    finally:
        emulator.stop()
