from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.v1 import image_hosts_pb2_grpc
from tests.support.broker_process import BrokerProcess
from tests.support.vault_target import VaultTarget
from tests.support.vault_target import vault_target as _vault_target


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A fresh broker process with an empty embedded store."""
    process = BrokerProcess(tmp_path / "data").start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def hosts(broker: BrokerProcess) -> image_hosts_pb2_grpc.ImageHostServiceStub:
    return broker.image_hosts()


@pytest.fixture(scope="session")
def vault() -> Iterator[VaultTarget]:
    """The Vault emulator for the whole session, or a real Vault when VAULT_ADDR is set."""
    yield from _vault_target()
