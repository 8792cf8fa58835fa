"""broker.core.swarm.SwarmEngine on a Swarm manager's Docker Engine (docker-py).

docker-py's `create_service` takes no registry auth (it would send the broker
host's own docker login): the pre-pull job is created with a plain
`POST /services/create` carrying the X-Registry-Auth header, which Swarm stores
in the service spec and hands to every node's task.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import requests
import urllib3.exceptions

from broker.core.secrets import Secret
from broker.core.swarm import PREPULL_COMMAND, PREPULL_LABEL, PrepullTask, SwarmNode
from broker.engines.docker_engine import EngineConnector, classify, engine_unavailable

_T = TypeVar("_T")
#: Bound on each engine call: a pre-pull polls, it never waits inside one call.
_CALL_TIMEOUT = 30.0
#: How long the engine's Swarm state is taken as known.
_INFO_TTL = 2.0


class SwarmEngine:
    def __init__(
        self, environment: Mapping[str, str] | None = None, timeout: float = _CALL_TIMEOUT
    ) -> None:
        self._engine = EngineConnector(environment, timeout)
        self._info: tuple[float, dict[str, Any]] | None = None
        self._info_lock = threading.Lock()

    @contextlib.contextmanager
    def _client(self) -> Iterator[docker.APIClient]:
        client = self._engine.client()
        try:
            yield client
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise engine_unavailable(exc) from None
        finally:
            client.close()

    def _call(self, action: Callable[[docker.APIClient], _T]) -> _T:
        with self._client() as client:
            try:
                return action(client)
            except docker.errors.APIError as exc:
                raise classify(str(exc.explanation or exc)) from None

    def _swarm_info(self) -> dict[str, Any]:
        """The engine's Swarm state, asked at most once per `_INFO_TTL` (a pull asks
        whether this is a manager, and which node it is, in the same breath)."""
        with self._info_lock:
            if self._info is not None and time.monotonic() - self._info[0] < _INFO_TTL:
                return self._info[1]
        info: dict[str, Any] = self._call(lambda c: c.info()).get("Swarm") or {}
        with self._info_lock:
            self._info = (time.monotonic(), info)
        return info

    def is_swarm_manager(self) -> bool:
        info = self._swarm_info()
        return info.get("LocalNodeState") == "active" and bool(info.get("ControlAvailable"))

    def local_node_id(self) -> str:
        return str(self._swarm_info().get("NodeID") or "")

    def nodes(self) -> list[SwarmNode]:
        return [_node_of(raw) for raw in self._call(lambda c: c.nodes())]

    def resolve_digest(self, image: str, auth_config: Mapping[str, str] | None) -> str:
        # {} rather than None: with None docker-py sends the broker host's own docker login.
        answer = self._call(
            lambda c: c.inspect_distribution(image, auth_config=dict(auth_config or {}))
        )
        return str((answer.get("Descriptor") or {}).get("digest") or "")

    def has_image(self, image: str) -> bool:
        with self._client() as client:
            try:
                client.inspect_image(image)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                raise classify(str(exc.explanation or exc)) from None
            return True

    def start_prepull(
        self,
        image: str,
        registry_auth: Secret,
        constraints: Sequence[str],
        labels: Mapping[str, str],
    ) -> str:
        template = docker.types.TaskTemplate(
            container_spec=docker.types.ContainerSpec(image=image, command=[PREPULL_COMMAND]),
            restart_policy=docker.types.RestartPolicy(condition="none"),
            placement=docker.types.Placement(constraints=list(constraints)),
        )
        body = {
            "Name": f"credbroker-prepull-{secrets.token_hex(6)}",
            "Labels": dict(labels),
            "TaskTemplate": template,
            # Not "global-job": see broker/core/swarm.py.
            "Mode": docker.types.ServiceMode("global"),
        }
        headers = {"X-Registry-Auth": registry_auth.reveal()} if registry_auth else {}

        def create(client: docker.APIClient) -> str:
            response = client._post_json(
                client._url("/services/create"), data=body, headers=headers
            )
            return str(client._result(response, True)["ID"])

        return self._call(create)

    def prepull_tasks(self, service_id: str) -> list[PrepullTask]:
        tasks = self._call(lambda c: c.tasks(filters={"service": service_id}))
        return [
            PrepullTask(
                node_id=str(t.get("NodeID") or ""),
                state=str((t.get("Status") or {}).get("State") or ""),
                message=str((t.get("Status") or {}).get("Message") or ""),
                error=str((t.get("Status") or {}).get("Err") or ""),
            )
            for t in tasks
            if t.get("NodeID")
        ]

    def remove_prepull(self, service_id: str) -> None:
        with self._client() as client, contextlib.suppress(docker.errors.NotFound):
            client.remove_service(service_id)

    def remove_stale_prepulls(self, older_than: float) -> int:
        now = dt.datetime.now(dt.UTC)
        removed = 0
        services = self._call(lambda c: c.services(filters={"label": PREPULL_LABEL}))
        for service in services:
            created = _timestamp(str(service.get("CreatedAt") or ""))
            if created is not None and (now - created).total_seconds() > older_than:
                self.remove_prepull(str(service["ID"]))
                removed += 1
        return removed


def _node_of(raw: Mapping[str, Any]) -> SwarmNode:
    spec = raw.get("Spec") or {}
    description = raw.get("Description") or {}
    platform = description.get("Platform") or {}
    return SwarmNode(
        id=str(raw.get("ID") or ""),
        hostname=str(description.get("Hostname") or ""),
        role=str(spec.get("Role") or ""),
        ready=(raw.get("Status") or {}).get("State") == "ready",
        active=spec.get("Availability") == "active",
        os=str(platform.get("OS") or ""),
        arch=str(platform.get("Architecture") or ""),
        labels=dict(spec.get("Labels") or {}),
        engine_labels=dict((description.get("Engine") or {}).get("Labels") or {}),
    )


def _timestamp(text: str) -> dt.datetime | None:
    """Swarm's RFC 3339 times carry nanoseconds, which datetime cannot parse."""
    head, dot, rest = text.partition(".")
    if dot:
        digits = rest.rstrip("Z")[:6]
        text = f"{head}.{digits}+00:00"
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
