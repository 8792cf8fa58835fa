"""PullImage: resolve the image's credentials, then pull it on an engine or a Swarm."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.core.audit import Actor
from broker.core.errors import InvalidArgument
from broker.core.resolution import CredentialResolver
from broker.core.secrets import EMPTY_SECRET, Secret
from broker.core.swarm import NodeOutcome, SwarmPuller, SwarmPullOutcome


class Backend(enum.Enum):
    AUTO = "auto"
    DOCKER = "docker"
    SWARM = "swarm"


@dataclass(frozen=True)
class LayerProgress:
    layer: str
    status: str
    current_bytes: int = 0
    total_bytes: int = 0


@dataclass(frozen=True)
class Pulled:
    """The engine's last word on a successful pull."""

    digest: str


@dataclass(frozen=True)
class PullOutcome:
    image: str
    #: `registry/repository`, without tag or digest.
    name: str
    digest: str
    image_host: str
    registry_auth: Secret = EMPTY_SECRET

    @property
    def pinned_image(self) -> str:
        """The reference pinned to what was pulled: every node gets the same image."""
        return f"{self.name}@{self.digest}" if self.digest else self.image


class ImageEngine(Protocol):
    def pull(
        self,
        image: str,
        auth_config: Mapping[str, str] | None,
        platform: str,
        is_active: Callable[[], bool],
    ) -> Iterator[LayerProgress | Pulled]:
        """Pull `image`; raise broker errors (REGISTRY_AUTH_FAILED, NOT_FOUND, UNAVAILABLE)."""
        ...


class Puller:
    def __init__(self, resolver: CredentialResolver, engine: ImageEngine) -> None:
        self._resolver = resolver
        self._engine = engine

    def pull(
        self,
        image: str,
        platform: str,
        include_registry_auth: bool,
        actor: Actor,
        is_active: Callable[[], bool],
    ) -> Iterator[LayerProgress | PullOutcome]:
        if platform and platform.count("/") not in (1, 2):
            raise InvalidArgument.single("platform", "must look like os/arch[/variant]")
        resolution = self._resolver.resolve(image, actor)
        reference = resolution.reference.fully_qualified
        digest = ""
        for event in self._engine.pull(reference, resolution.auth_config(), platform, is_active):
            if isinstance(event, Pulled):
                digest = event.digest
            else:
                yield event
        yield PullOutcome(
            image=reference,
            name=resolution.reference.name,
            digest=digest,
            image_host=resolution.host.name if resolution.host and not resolution.anonymous else "",
            registry_auth=(
                self._resolver.disclose_registry_auth(resolution, actor)
                if include_registry_auth
                else EMPTY_SECRET
            ),
        )


PullEvent = LayerProgress | PullOutcome | NodeOutcome | SwarmPullOutcome


class Pulls:
    """Sends a pull to the Docker engine or, on an active Swarm manager, to the Swarm."""

    def __init__(self, docker: Puller, swarm: SwarmPuller) -> None:
        self._docker = docker
        self._swarm = swarm

    def pull(
        self,
        image: str,
        backend: Backend,
        platform: str,
        placement_constraints: Sequence[str],
        include_registry_auth: bool,
        actor: Actor,
        is_active: Callable[[], bool],
        time_remaining: float | None,
    ) -> Iterator[PullEvent]:
        if backend is Backend.DOCKER and placement_constraints:
            raise InvalidArgument.single(
                "placement_constraints", "apply to Swarm pulls only (backend SWARM)"
            )
        if backend is Backend.SWARM and platform:
            raise InvalidArgument.single(
                "platform",
                "applies to Docker pulls only: on a Swarm, choose nodes with "
                "placement_constraints such as node.platform.arch==amd64",
            )
        if backend is Backend.AUTO:
            # The engine decides, unless the request already only fits one backend.
            if platform:
                backend = Backend.DOCKER
            elif placement_constraints or self._swarm.is_available():
                backend = Backend.SWARM
            else:
                backend = Backend.DOCKER
        if backend is Backend.SWARM:
            yield from self._swarm.pull(
                image,
                placement_constraints,
                include_registry_auth,
                actor,
                is_active,
                time_remaining,
            )
        else:
            yield from self._docker.pull(image, platform, include_registry_auth, actor, is_active)
