"""Which credentials an image reference gets (DESIGN.md, "Resolution").

A qualified reference gets the credentials of the image host with the same
registry and the longest repository prefix that contains the image; no such
host means anonymous. An unqualified reference is placed on the default host's
registry (under its repository prefix, if it has one; `library/` only on
Docker Hub) and gets that host's credentials. Credentials are never those of
another registry than the image's own.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from broker.core.audit import Actor, AuditEvent, AuditSink
from broker.core.errors import InvalidArgument, PermissionDenied
from broker.core.image_hosts import RESOURCE_PREFIX, ImageHost, ImageHostCatalog
from broker.core.references import ImageReference, InvalidReference, parse_reference
from broker.core.registry_url import DOCKER_HUB, DOCKER_HUB_SERVER_ADDRESS
from broker.core.secrets import EMPTY_SECRET, Secret

#: The username Docker uses for an identity (refresh) token instead of a password.
IDENTITY_TOKEN_USERNAME = "<token>"  # noqa: S105 - a marker, not a secret


@dataclass(frozen=True)
class Resolution:
    reference: ImageReference
    host: ImageHost | None

    @property
    def anonymous(self) -> bool:
        return self.host is None or not self.host.access_token

    @property
    def username(self) -> str:
        return "" if self.anonymous or self.host is None else self.host.username

    @property
    def secret(self) -> Secret:
        return EMPTY_SECRET if self.anonymous or self.host is None else self.host.access_token

    @property
    def server_address(self) -> str:
        """The key Docker uses for the image's registry (config.json, credential helpers)."""
        if self.host is not None:
            return self.host.server_address
        if self.reference.registry == DOCKER_HUB:
            return DOCKER_HUB_SERVER_ADDRESS
        return self.reference.registry

    def auth_config(self) -> dict[str, str] | None:
        """Docker's AuthConfig for this image's registry; None when anonymous."""
        if self.anonymous:
            return None
        secret = self.secret.reveal()
        if self.username == IDENTITY_TOKEN_USERNAME:
            return {"identitytoken": secret, "serveraddress": self.reference.registry}
        return {
            "username": self.username,
            "password": secret,
            "serveraddress": self.reference.registry,
        }

    def registry_auth(self) -> str:
        """The X-Registry-Auth header value: base64url JSON, with padding; "" if anonymous."""
        config = self.auth_config()
        if config is None:
            return ""
        return base64.urlsafe_b64encode(json.dumps(config).encode()).decode()


class CredentialResolver:
    def __init__(self, catalog: ImageHostCatalog, audit: AuditSink) -> None:
        self._catalog = catalog
        self._audit = audit

    def resolve(self, image: str, actor: Actor) -> Resolution:
        reference = _parse(image)
        if reference.qualified:
            host = self._host_for(reference)
        else:
            host = self._catalog.get_default(actor)
            reference = _place_on(reference, host)
        if host is not None and not actor.may_use_host(host.id):
            # The image's host exists but is outside the caller's scope.
            raise PermissionDenied(
                f"principal {actor.principal} may not use the credentials of {host.name}",
                reason="IMAGE_HOST_OUT_OF_SCOPE",
            )
        resolution = Resolution(reference=reference, host=host)
        self._audit(
            AuditEvent(
                action="ResolveCredentials",
                actor=actor,
                resource=host.name if host else "",
                details={
                    "resolved_image": reference.fully_qualified,
                    "disclosed": "no" if resolution.anonymous else "yes",
                },
            )
        )
        return resolution

    def disclose_registry_auth(self, resolution: Resolution, actor: Actor) -> Secret:
        """The X-Registry-Auth value handed to the caller itself (PullImage with
        `include_registry_auth`): a disclosure like ResolveCredentials, audited as one."""
        value = resolution.registry_auth()
        self._audit(
            AuditEvent(
                action="DiscloseRegistryAuth",
                actor=actor,
                resource=resolution.host.name if resolution.host else "",
                details={"registry_auth_returned": "yes" if value else "no"},
            )
        )
        return Secret(value)

    def _host_for(self, reference: ImageReference) -> ImageHost | None:
        candidates = [
            h
            for h in self._catalog.all_hosts()
            if h.location.registry == reference.registry
            and reference.in_prefix(h.location.repository_prefix)
        ]
        return max(candidates, key=lambda h: len(h.location.repository_prefix), default=None)


def _parse(image: str) -> ImageReference:
    if not image:
        raise InvalidArgument.single("image", "is required")
    try:
        return parse_reference(image)
    except InvalidReference as exc:
        raise InvalidArgument.single("image", str(exc)) from None


def _place_on(reference: ImageReference, host: ImageHost) -> ImageReference:
    location = host.location
    if not location.repository_prefix:
        return reference.on_registry(location.registry)
    # A default host scoped to a prefix (ghcr.io/acme) takes unqualified images
    # below that prefix: team/tool -> ghcr.io/acme/team/tool.
    suffix = reference.fully_qualified.removeprefix(reference.name)
    text = f"{location.registry}/{location.repository_prefix}/{reference.path}{suffix}"
    try:
        return parse_reference(text)
    except InvalidReference as exc:
        raise InvalidArgument.single(
            "image", f"does not fit under the default host {RESOURCE_PREFIX}{host.id}: {exc}"
        ) from None
