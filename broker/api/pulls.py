"""PullService: stream a pull's progress and end with the pulled digest."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from broker.api.context import actor_of
from broker.core.errors import InvalidArgument
from broker.core.pulls import Puller, PullOutcome
from broker.v1 import pulls_pb2, pulls_pb2_grpc


class PullServicer(pulls_pb2_grpc.PullServiceServicer):
    def __init__(self, puller: Puller) -> None:
        self._puller = puller

    def PullImage(
        self, request: pulls_pb2.PullImageRequest, context: grpc.ServicerContext
    ) -> Iterator[pulls_pb2.PullImageResponse]:
        if request.backend == pulls_pb2.PULL_BACKEND_SWARM:
            raise InvalidArgument.single("backend", "Swarm pulls are not available yet")
        for event in self._puller.pull(
            request.image, request.platform, actor_of(context), context.is_active
        ):
            if isinstance(event, PullOutcome):
                yield pulls_pb2.PullImageResponse(
                    result=pulls_pb2.PullResult(
                        image=event.image,
                        digest=event.digest,
                        image_host=event.image_host,
                        pinned_image=event.pinned_image,
                    )
                )
            else:
                yield pulls_pb2.PullImageResponse(
                    progress=pulls_pb2.LayerProgress(
                        layer=event.layer,
                        status=event.status,
                        current_bytes=event.current_bytes,
                        total_bytes=event.total_bytes,
                    )
                )
