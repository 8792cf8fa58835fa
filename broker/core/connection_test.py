"""TestImageHost: does the registry answer, and does it accept the credentials?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from broker.core.audit import Actor, AuditEvent, AuditSink
from broker.core.errors import FieldViolation, InvalidArgument
from broker.core.image_hosts import ImageHostCatalog, validate_credentials
from broker.core.registry_url import RegistryLocation
from broker.core.secrets import EMPTY_SECRET, Secret

ProbeOutcome = Literal["OK", "UNAUTHORIZED", "UNREACHABLE", "TLS_ERROR", "NOT_A_REGISTRY"]


@dataclass(frozen=True)
class RegistryCredentials:
    username: str
    secret: Secret


@dataclass(frozen=True)
class ProbeResult:
    result: ProbeOutcome
    message: str
    auth_scheme: str
    endpoint: str = ""
    latency: float = 0.0


class Prober(Protocol):
    def probe(
        self, location: RegistryLocation, credentials: RegistryCredentials
    ) -> ProbeResult: ...


@dataclass(frozen=True)
class Candidate:
    """Credentials to try once instead of the stored ones; never stored or logged."""

    username: str
    access_token: Secret


class ConnectionTester:
    def __init__(self, catalog: ImageHostCatalog, prober: Prober, audit: AuditSink) -> None:
        self._catalog = catalog
        self._prober = prober
        self._audit = audit

    def test(self, image_host_id: str, candidate: Candidate | None, actor: Actor) -> ProbeResult:
        host = self._catalog.get(image_host_id, actor)
        if candidate is None:
            credentials = RegistryCredentials(host.username, host.access_token)
        else:
            try:
                validate_credentials(candidate.username, candidate.access_token)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    [FieldViolation(f"candidate_{v.field}", v.description) for v in exc.violations]
                ) from None
            credentials = RegistryCredentials(candidate.username, candidate.access_token)
        if not credentials.secret:
            credentials = RegistryCredentials(credentials.username, EMPTY_SECRET)
        result = self._prober.probe(host.location, credentials)
        self._audit(
            AuditEvent(
                action="TestImageHost",
                actor=actor,
                resource=host.name,
                details={
                    "result": result.result,
                    "credentials": "candidate" if candidate is not None else "stored",
                },
            )
        )
        return result
