"""Server TLS with certificates re-read from disk when their files change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

_log = logging.getLogger("credbroker.tls")


class TlsConfigError(ValueError):
    """A certificate, key or CA file is missing or unusable."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    #: CA that signs client certificates; set means mutual TLS is required.
    client_ca: Path | None = None

    def paths(self) -> list[Path]:
        return [p for p in (self.cert, self.key, self.client_ca) if p is not None]


def _signature(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    result = []
    for path in files.paths():
        st = path.stat()
        result.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(result)


def _load(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    try:
        cert = files.cert.read_bytes()
        key = files.key.read_bytes()
        ca = files.client_ca.read_bytes() if files.client_ca else None
    except OSError as exc:
        raise TlsConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    # Parse before handing to gRPC: a half-written file must not replace a good one.
    try:
        x509.load_pem_x509_certificates(cert)
        load_pem_private_key(key, password=None)
        if ca is not None:
            x509.load_pem_x509_certificates(ca)
    except (ValueError, TypeError) as exc:
        raise TlsConfigError(f"unusable certificate, key or CA: {exc}") from None
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS (mutual when a client CA is given) whose files are re-read on change."""
    lock = threading.Lock()
    state = {"signature": _signature(files)}
    initial = _load(files)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on new handshakes; None keeps the current certificates.
        with lock:
            try:
                signature = _signature(files)
                if signature == state["signature"]:
                    return None
                config = _load(files)
            except (OSError, TlsConfigError) as exc:
                _log.warning("keeping the current TLS certificates: %s", exc)
                return None
            state["signature"] = signature
            _log.info("TLS certificates reloaded from %s", files.cert)
            return config

    # grpc-stubs omit that the fetcher may return None ("unchanged").
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
    return grpc.dynamic_ssl_server_credentials(
        initial, fetcher, require_client_authentication=files.client_ca is not None
    )
