"""CredentialService: resolve an image reference to the credentials that pull it."""

from __future__ import annotations

import grpc

from broker.api.context import actor_of
from broker.core.resolution import CredentialResolver
from broker.v1 import credentials_pb2, credentials_pb2_grpc


class CredentialServicer(credentials_pb2_grpc.CredentialServiceServicer):
    def __init__(self, resolver: CredentialResolver) -> None:
        self._resolver = resolver

    def ResolveCredentials(
        self, request: credentials_pb2.ResolveCredentialsRequest, context: grpc.ServicerContext
    ) -> credentials_pb2.ResolveCredentialsResponse:
        resolution = self._resolver.resolve(request.image, actor_of(context))
        return credentials_pb2.ResolveCredentialsResponse(
            image=resolution.reference.fully_qualified,
            registry=resolution.reference.registry,
            image_host=resolution.host.name if resolution.host else "",
            anonymous=resolution.anonymous,
            username=resolution.username,
            secret=resolution.secret.reveal(),
            server_address=resolution.server_address,
            registry_auth=resolution.registry_auth(),
            plain_http=bool(resolution.host and resolution.host.location.plain_http),
        )
