"""Pulls on a Docker Engine through docker-py (the only importer of the docker SDK).

Errors of a pull arrive inside the 200 stream as `{"errorDetail":..,"error":..}`
lines: every line is checked. Cancelling closes the client, which closes the
connection, and the engine stops the pull.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import docker
import docker.errors
import requests
import urllib3.exceptions

from broker.core.errors import FailedPrecondition, NotFound, Unavailable
from broker.core.pulls import LayerProgress, Pulled

_DIGEST_LINE = re.compile(r"Digest: (sha256:[0-9a-f]{64})")
_AUTH_WORDS = (
    "unauthorized",
    "authentication required",
    "denied",
    "no basic auth credentials",
    "incorrect username or password",
)
_MISSING_WORDS = ("manifest unknown", "not found", "does not exist", "name unknown")
_NETWORK_WORDS = ("connection refused", "no such host", "i/o timeout", "connection reset", "eof")
_MAX_WORDS = 500
#: How often a pull checks whether its caller is still there while no line comes.
_WATCH_INTERVAL = 0.25


def classify(message: str) -> Exception:
    """The broker error for an engine's or registry's words about a failed pull."""
    words = message.strip()[:_MAX_WORDS]
    lowered = words.lower()
    if any(w in lowered for w in _AUTH_WORDS):
        return FailedPrecondition(
            f"the registry refused the credentials: {words}", reason="REGISTRY_AUTH_FAILED"
        )
    if any(w in lowered for w in _MISSING_WORDS):
        return NotFound(f"no such image: {words}", reason="IMAGE_NOT_FOUND")
    if any(w in lowered for w in _NETWORK_WORDS):
        return Unavailable(
            f"the registry cannot be reached: {words}", reason="REGISTRY_UNAVAILABLE"
        )
    return FailedPrecondition(f"the pull failed: {words}", reason="PULL_FAILED")


def _socket_of(response: requests.Response) -> socket.socket | None:
    """The socket under a streaming answer (where docker-py finds it for `attach`)."""
    raw: Any = getattr(getattr(getattr(response.raw, "_fp", None), "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


class _HangUp:
    """Cuts the engine's answer stream as soon as the caller goes away.

    The pull loop notices a cancelled call only when the engine sends a line; a
    registry that stalls sends none, and the pull would go on for as long as it
    stalls. A watcher shuts the connection down instead: the blocked read returns,
    and the engine, seeing its client gone, stops the pull.
    """

    def __init__(self, client: docker.APIClient, is_active: Callable[[], bool]) -> None:
        self._is_active = is_active
        self._responses: list[requests.Response] = []
        self._stop = threading.Event()
        self.done = False
        client.hooks["response"].append(self._remember)
        self._thread = threading.Thread(target=self._watch, name="pull-hang-up", daemon=True)

    def _remember(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        self._responses.append(response)

    def __enter__(self) -> _HangUp:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_INTERVAL):
            if not self._is_active():
                self.done = True
                for response in self._responses:
                    sock = _socket_of(response)
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                return


def engine_unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(
        f"the Docker engine cannot be reached: {type(exc).__name__}", reason="ENGINE_UNAVAILABLE"
    )


class EngineConnector:
    """Clients of the engine named by DOCKER_HOST (and DOCKER_TLS_VERIFY, DOCKER_CERT_PATH).

    The API version is asked once (`GET /version`), not on every new client.
    """

    def __init__(self, environment: Mapping[str, str] | None, timeout: float) -> None:
        self._environment = dict(environment) if environment is not None else None
        self._timeout = timeout
        self._api_version = "auto"

    def client(self) -> docker.APIClient:
        try:
            kwargs: dict[str, Any] = docker.utils.kwargs_from_env(environment=self._environment)
            client = docker.APIClient(timeout=self._timeout, version=self._api_version, **kwargs)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise engine_unavailable(exc) from None
        self._api_version = str(client.api_version)
        return client


class DockerEngine:
    """broker.core.pulls.ImageEngine on the engine named by DOCKER_HOST (and TLS settings)."""

    def __init__(
        self, environment: Mapping[str, str] | None = None, timeout: float = 600.0
    ) -> None:
        self._engine = EngineConnector(environment, timeout)

    def _client(self) -> docker.APIClient:
        return self._engine.client()

    def pull(
        self,
        image: str,
        auth_config: Mapping[str, str] | None,
        platform: str,
        is_active: Callable[[], bool],
    ) -> Iterator[LayerProgress | Pulled]:
        client = self._client()
        hang_up = _HangUp(client, is_active)
        try:
            try:
                with hang_up:
                    lines = client.pull(
                        image,
                        stream=True,
                        decode=True,
                        # {} rather than None: with None, docker-py sends the credentials of
                        # the broker's own ~/.docker/config.json (or credential helper).
                        auth_config=dict(auth_config) if auth_config else {},
                        platform=platform or None,
                    )
                    digest = ""
                    for line in lines:
                        if not is_active():
                            return  # the caller went away: closing the client stops the pull
                        if "error" in line or "errorDetail" in line:
                            detail = line.get("errorDetail") or {}
                            raise classify(str(detail.get("message") or line.get("error") or ""))
                        status = str(line.get("status") or "")
                        found = _DIGEST_LINE.search(status)
                        if found:
                            digest = found.group(1)
                        progress = line.get("progressDetail") or {}
                        yield LayerProgress(
                            layer=str(line.get("id") or ""),
                            status=status,
                            current_bytes=int(progress.get("current") or 0),
                            total_bytes=int(progress.get("total") or 0),
                        )
                    if hang_up.done:
                        return  # the stream was cut because the caller went away
                    yield Pulled(digest=digest or self._digest_of(client, image))
            except docker.errors.APIError as exc:
                raise classify(str(exc.explanation or exc)) from None
            except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                if hang_up.done:
                    return  # the stream was cut because the caller went away
                raise engine_unavailable(exc) from None
        finally:
            client.close()

    @staticmethod
    def _digest_of(client: docker.APIClient, image: str) -> str:
        name = image.split("@", 1)[0]
        for digest in client.inspect_image(image).get("RepoDigests") or []:
            repo, _, value = str(digest).partition("@")
            if name.startswith(repo) or repo.endswith(name.split("/", 1)[-1].split(":", 1)[0]):
                return value
        return ""
