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
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

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
        try:
            st = path.stat()
        except OSError as exc:
            raise TlsConfigError(f"cannot read {path}: {exc.strerror}") from None
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
        chain = x509.load_pem_x509_certificates(cert)
        private_key = load_pem_private_key(key, password=None)
        if ca is not None:
            x509.load_pem_x509_certificates(ca)
    except (ValueError, TypeError) as exc:
        raise TlsConfigError(f"unusable certificate, key or CA: {exc}") from None
    # A certificate replaced before its key (or the wrong key) is no usable pair either.
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if chain[0].public_key().public_bytes(*spki) != private_key.public_key().public_bytes(*spki):
        raise TlsConfigError(
            f"the key in {files.key} does not match the certificate in {files.cert}"
        )
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class _ReloadingCertificates:
    """gRPC's certificate fetcher: new files once they form a usable set."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._loaded = _signature(files)
        # The last unusable state of the files, warned about once rather than per handshake.
        self._refused: object = None
        self.initial = _load(files)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        # None keeps the current certificates.
        with self._lock:
            try:
                signature = _signature(self._files)
                if signature == self._loaded:
                    return None
                config = _load(self._files)
            except TlsConfigError as exc:
                self._refuse(str(exc))
                return None
            self._loaded, self._refused = signature, None
            _log.info("TLS certificates reloaded from %s", self._files.cert)
            return config

    def _refuse(self, problem: str) -> None:
        if problem != self._refused:
            self._refused = problem
            _log.warning("keeping the current TLS certificates: %s", problem)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS (mutual when a client CA is given) whose files are re-read on change."""
    certificates = _ReloadingCertificates(files)
    # grpc-stubs omit that the fetcher may return None ("unchanged").
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], certificates)
    return grpc.dynamic_ssl_server_credentials(
        certificates.initial, fetcher, require_client_authentication=files.client_ca is not None
    )
