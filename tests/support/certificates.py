"""A small certificate authority for tests, made with `cryptography`.

`CertificateAuthority("name", directory)` creates a self-signed CA (EC P-256)
and writes `name-ca.pem`. It issues server certificates (SAN 127.0.0.1,
localhost) and client certificates (subject CN, optional SAN URIs such as a
SPIFFE id and SAN DNS names), valid now or already expired. Each issued pair
is written as `LABEL.pem` and `LABEL-key.pem` (mode 0600) into the directory;
keys are never printed. Two CAs made this way are unrelated: neither trusts
the other's certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path

    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    def key_pem(self) -> bytes:
        return self.key.read_bytes()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A self-signed CA whose certificate is at `self.cert` (`NAME-ca.pem`)."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "credbroker tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA"),
            ]
        )
        now = _now()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + 30 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = _write(
            directory / f"{name}-ca.pem",
            self.certificate.public_bytes(serialization.Encoding.PEM),
        )

    def _issue(
        self,
        label: str,
        common_name: str,
        san: Sequence[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        *,
        expired: bool,
    ) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        if expired:
            not_before, not_after = now - 10 * _ONE_DAY, now - _ONE_DAY
        else:
            not_before, not_after = now - _ONE_DAY, now + 10 * _ONE_DAY
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            cert=_write(
                self.directory / f"{label}.pem",
                certificate.public_bytes(serialization.Encoding.PEM),
            ),
            key=_write(self.directory / f"{label}-key.pem", _key_pem(key), 0o600),
        )

    def server(self, label: str = "server", *, expired: bool = False) -> IssuedCertificate:
        """A server certificate for 127.0.0.1 and localhost."""
        san: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]
        return self._issue(
            label, "localhost", san, ExtendedKeyUsageOID.SERVER_AUTH, expired=expired
        )

    def client(
        self,
        common_name: str,
        *,
        uris: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        label: str | None = None,
        expired: bool = False,
    ) -> IssuedCertificate:
        """A client certificate: subject CN `common_name`, SAN URIs and DNS names."""
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        san += [x509.DNSName(name) for name in dns_names]
        return self._issue(
            label or f"client-{common_name}",
            common_name,
            san,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            expired=expired,
        )
