"""PullService: stream a pull's progress (per layer, or per Swarm node) and end with the result."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from broker.api.context import actor_of
from broker.core.errors import InvalidArgument
from broker.core.pulls import Backend, LayerProgress, PullEvent, Pulls
from broker.core.swarm import NodeOutcome, NodeState, SwarmPullOutcome
from broker.v1 import pulls_pb2, pulls_pb2_grpc

_BACKENDS = {
    pulls_pb2.PULL_BACKEND_UNSPECIFIED: Backend.AUTO,
    pulls_pb2.PULL_BACKEND_DOCKER: Backend.DOCKER,
    pulls_pb2.PULL_BACKEND_SWARM: Backend.SWARM,
}
_NODE_STATES = {
    NodeState.PULLED: pulls_pb2.NODE_PULL_STATE_PULLED,
    NodeState.ALREADY_PRESENT: pulls_pb2.NODE_PULL_STATE_ALREADY_PRESENT,
    NodeState.FAILED: pulls_pb2.NODE_PULL_STATE_FAILED,
}


def _node(outcome: NodeOutcome) -> pulls_pb2.NodePull:
    return pulls_pb2.NodePull(
        node_id=outcome.node_id,
        hostname=outcome.hostname,
        state=_NODE_STATES[outcome.state],
        reason=outcome.reason,
    )


def _message(event: PullEvent) -> pulls_pb2.PullImageResponse:
    if isinstance(event, LayerProgress):
        return pulls_pb2.PullImageResponse(
            progress=pulls_pb2.LayerProgress(
                layer=event.layer,
                status=event.status,
                current_bytes=event.current_bytes,
                total_bytes=event.total_bytes,
            )
        )
    if isinstance(event, NodeOutcome):
        return pulls_pb2.PullImageResponse(node=_node(event))
    on_swarm = isinstance(event, SwarmPullOutcome)
    return pulls_pb2.PullImageResponse(
        result=pulls_pb2.PullResult(
            image=event.image,
            digest=event.digest,
            image_host=event.image_host,
            pinned_image=event.pinned_image,
            backend=pulls_pb2.PULL_BACKEND_SWARM if on_swarm else pulls_pb2.PULL_BACKEND_DOCKER,
            nodes=[_node(n) for n in event.nodes] if isinstance(event, SwarmPullOutcome) else [],
            registry_auth=event.registry_auth.reveal(),
        )
    )


class PullServicer(pulls_pb2_grpc.PullServiceServicer):
    def __init__(self, pulls: Pulls) -> None:
        self._pulls = pulls

    def PullImage(
        self, request: pulls_pb2.PullImageRequest, context: grpc.ServicerContext
    ) -> Iterator[pulls_pb2.PullImageResponse]:
        backend = _BACKENDS.get(request.backend)
        if backend is None:
            raise InvalidArgument.single("backend", "must be UNSPECIFIED, DOCKER or SWARM")
        events = self._pulls.pull(
            request.image,
            backend,
            request.platform,
            list(request.placement_constraints),
            request.include_registry_auth,
            actor_of(context),
            context.is_active,
            context.time_remaining(),
        )
        for event in events:
            yield _message(event)
