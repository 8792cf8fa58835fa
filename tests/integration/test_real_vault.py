"""The one test that may skip: it names the Vault the suite ran against.

With VAULT_ADDR and VAULT_TOKEN set, the session `vault` fixture is that real
Vault, and every Vault test (the store contract included) runs against it.
Without them it is the emulator, and this test says so by skipping.
"""

from __future__ import annotations

import os

import pytest

from broker.stores.base import Put, VersionConflict
from tests.support.vault_target import VaultTarget

pytestmark = pytest.mark.integration


def test_the_suite_ran_against_a_real_vault(vault: VaultTarget) -> None:
    if not os.environ.get("VAULT_ADDR"):
        pytest.skip(
            "VAULT_ADDR and VAULT_TOKEN are not set: the Vault tests ran against the "
            "emulator in tests/support/vault_emulator.py; set both to run them against "
            "a real Vault"
        )
    assert vault.real
    store = vault.store()
    try:
        store.commit([Put("probe", {"v": "1"}, 0)])
        with pytest.raises(VersionConflict):
            store.commit([Put("probe", {"v": "2"}, 0)])
        entry = store.get("probe")
        assert entry is not None
        assert (entry.version, dict(entry.data)) == (1, {"v": "1"})
    finally:
        store.close()
