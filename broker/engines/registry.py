"""The registry v2 handshake, as `docker login` does it, without pulling anything.

`GET /v2/`; on 401 follow the `WWW-Authenticate` challenge: Basic credentials
on `/v2/`, or a token from the Bearer realm (Basic credentials there), then
`GET /v2/` with that token. Plain HTTP only for `http://` hosts. Redirects are
not followed, so credentials only ever go to the registry and the token realm
it names itself.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import requests

from broker.core.connection_test import ProbeResult, RegistryCredentials
from broker.core.registry_url import DOCKER_HUB, RegistryLocation

#: Docker Hub's registry API lives on another host than its name.
DOCKER_HUB_API = "registry-1.docker.io"
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_MAX_MESSAGE = 300


def _endpoint(location: RegistryLocation) -> str:
    host = DOCKER_HUB_API if location.registry == DOCKER_HUB else location.registry
    scheme = "http" if location.plain_http else "https"
    return f"{scheme}://{host}/v2/"


def _registry_words(response: requests.Response) -> str:
    """The registry's own error text (distribution's {"errors":[{"message"}]}), short."""
    try:
        errors = response.json().get("errors") or []
        words = "; ".join(str(e.get("message") or e.get("code")) for e in errors)
    except (ValueError, AttributeError):
        words = ""
    return (words or response.reason or f"HTTP {response.status_code}")[:_MAX_MESSAGE]


class RegistryProber:
    """Implements broker.core.connection_test.Prober over HTTP(S)."""

    def __init__(self, *, ca_bundle: Path | None = None, timeout: float = 10.0) -> None:
        self._verify: bool | str = str(ca_bundle) if ca_bundle else True
        self._timeout = timeout

    def probe(self, location: RegistryLocation, credentials: RegistryCredentials) -> ProbeResult:
        endpoint = _endpoint(location)
        started = time.monotonic()
        with requests.Session() as session:
            session.trust_env = False  # no proxies or .netrc credentials from the environment
            try:
                result = self._handshake(session, endpoint, credentials)
            except requests.exceptions.SSLError:
                result = ProbeResult(
                    "TLS_ERROR",
                    "TLS handshake failed: the certificate is not trusted or does not match",
                    "",
                )
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                result = ProbeResult(
                    "UNREACHABLE", f"no answer from {endpoint}: {type(exc).__name__}", ""
                )
        return ProbeResult(
            result.result,
            result.message,
            result.auth_scheme,
            endpoint=endpoint,
            latency=time.monotonic() - started,
        )

    def _get(self, session: requests.Session, url: str, **kwargs: object) -> requests.Response:
        return session.get(
            url,
            timeout=self._timeout,
            verify=self._verify,
            allow_redirects=False,
            **kwargs,  # type: ignore[arg-type]
        )

    def _handshake(
        self, session: requests.Session, endpoint: str, credentials: RegistryCredentials
    ) -> ProbeResult:
        ping = self._get(session, endpoint)
        is_registry = "Docker-Distribution-API-Version" in ping.headers
        if ping.status_code == 200 and is_registry:
            return ProbeResult("OK", "the registry answered; it needs no credentials", "none")
        if ping.status_code != 401 or not is_registry:
            return ProbeResult(
                "NOT_A_REGISTRY",
                f"{endpoint} answered HTTP {ping.status_code} without the registry v2 API header",
                "",
            )
        challenge = ping.headers.get("WWW-Authenticate", "")
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        auth = (credentials.username, credentials.secret.reveal()) if credentials.username else None
        if scheme.lower() == "basic":
            if auth is None:
                return ProbeResult("UNAUTHORIZED", "the registry requires credentials", "basic")
            answer = self._get(session, endpoint, auth=auth)
            if answer.status_code == 200:
                return ProbeResult("OK", "the registry accepted the credentials", "basic")
            return ProbeResult(
                "UNAUTHORIZED",
                f"the registry refused the credentials: {_registry_words(answer)}",
                "basic",
            )
        if scheme.lower() == "bearer" and params.get("realm"):
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            token_answer = self._get(session, params["realm"], params=query, auth=auth)
            if token_answer.status_code != 200:
                return ProbeResult(
                    "UNAUTHORIZED",
                    f"the token service refused the credentials: {_registry_words(token_answer)}",
                    "bearer",
                )
            try:
                body = token_answer.json()
                token = str(body.get("token") or body.get("access_token") or "")
            except (ValueError, AttributeError):
                token = ""
            if not token:
                return ProbeResult(
                    "NOT_A_REGISTRY", "the token service returned no token", "bearer"
                )
            answer = self._get(session, endpoint, headers={"Authorization": f"Bearer {token}"})
            if answer.status_code == 200:
                return ProbeResult(
                    "OK",
                    "the registry accepted the credentials" if auth else "anonymous access works",
                    "bearer",
                )
            return ProbeResult(
                "UNAUTHORIZED",
                f"the registry refused the token: {_registry_words(answer)}",
                "bearer",
            )
        return ProbeResult("NOT_A_REGISTRY", f"unsupported authentication challenge {scheme!r}", "")
