"""Server interceptors that run code around each call's behaviour.

gRPC's Python server offers no per-call hook with the ServicerContext, so an
`AroundInterceptor` rewraps the method handler: its `around` context manager
runs in the handler's thread, around the whole call (a stream included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor
    Handler = grpc.RpcMethodHandler


class AroundInterceptor(_Interceptor):
    def wrap_deserializer(self, method: str, deserializer: Callable[[bytes], Any]) -> Any:
        """The request deserializer to use; by default the method's own."""
        return deserializer

    def around(
        self, method: str, request: Any, context: grpc.ServicerContext
    ) -> AbstractContextManager[None]:
        raise NotImplementedError

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        deserializer = handler.request_deserializer
        if deserializer is not None:
            deserializer = self.wrap_deserializer(method, deserializer)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                with self.around(method, request, context):
                    return inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with self.around(method, request, context):
                    yield from inner_us(request, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, deserializer, handler.response_serializer
            )
        # Client-streaming methods: only reflection has them, and it stays open.
        return handler
