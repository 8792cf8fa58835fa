"""What the servicers learn about the caller of the current RPC."""

from __future__ import annotations

import contextvars

import grpc

from broker.core.audit import Actor

ANONYMOUS = "anonymous"

#: Set by the security interceptor for the duration of one call.
current_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar(
    "current_actor", default=None
)


def actor_of(context: grpc.ServicerContext) -> Actor:
    return current_actor.get() or Actor(principal=ANONYMOUS, peer=context.peer())
