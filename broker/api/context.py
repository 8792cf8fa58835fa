"""What the servicers learn about the caller of the current RPC."""

from __future__ import annotations

import contextvars

import grpc

from broker.core.audit import Actor

ANONYMOUS = "anonymous"

#: Set by the authentication interceptor for the duration of one call.
current_principal: contextvars.ContextVar[str] = contextvars.ContextVar(
    "current_principal", default=ANONYMOUS
)


def actor_of(context: grpc.ServicerContext) -> Actor:
    return Actor(principal=current_principal.get(), peer=context.peer())
