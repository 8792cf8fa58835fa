"""PullImage: resolve the image's credentials, then pull it on an engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from broker.core.audit import Actor
from broker.core.errors import InvalidArgument
from broker.core.resolution import CredentialResolver


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
        self, image: str, platform: str, actor: Actor, is_active: Callable[[], bool]
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
        )
