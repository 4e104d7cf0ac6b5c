"""One interceptor: domain errors -> gRPC status codes, plus latency and in-flight metrics.

It also reads each request itself: bytes that are not the method's message are the
caller's mistake (INVALID_ARGUMENT naming the expected message), where gRPC's own
deserializer would answer UNKNOWN with a Python exception's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.gateway.metrics import GatewayMetrics
from service.protocol.errors import EngineError, InvalidInputError, code_name, message_of

logger = logging.getLogger(__name__)


class Undecodable:
    """What the lenient deserializer returns for bytes that are not the expected message."""

    def __init__(self, expected: str, size: int) -> None:
        self.error = InvalidInputError(
            f"the request is not a serialized {expected} ({size} bytes could not be parsed)"
        )


def lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, but returning :class:`Undecodable` instead of raising."""
    if deserializer is None:
        return None
    expected = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = expected.full_name if expected is not None else "request message"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError, or anything a bad byte string raises
            return Undecodable(name, len(data))

    return parse


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for an exception."""
    if isinstance(exc, EngineError):
        return getattr(grpc.StatusCode, code_name(exc)), message_of(exc)
    logger.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (see server logs)"


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by the servicer to statuses and records every call."""

    def __init__(self, metrics: GatewayMetrics, model_of: Callable[[Any], str]) -> None:
        self.metrics = metrics
        self.model_of = model_of
        self.active = 0  # calls in flight now
        self.started = 0  # calls started so far
        # The gauge reads the count when scraped, rather than taking prometheus_client's
        # lock twice per call on the event loop (py-spy put 19% of the gateway's samples
        # in that inc(), bench/results/e2e.md).
        metrics.in_flight.set_function(lambda: self.active)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/saliency.v1."):
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, handler.unary_unary),
                request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(rpc, handler.unary_stream),
                request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    @contextlib.asynccontextmanager
    async def _call(
        self, rpc: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Count the call in flight, time it, and turn an exception into its status."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self.active += 1
        self.started += 1
        try:
            if isinstance(request, Undecodable):
                raise request.error
            yield
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
        finally:
            self.active -= 1
            self._observe(rpc, request, code, start)

    def _unary(self, rpc: str, behaviour: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(rpc, request, context):
                return await behaviour(request, context)

        return wrapped

    def _stream(self, rpc: str, behaviour: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._call(rpc, request, context):
                async for item in behaviour(request, context):
                    yield item

        return wrapped

    def _observe(self, rpc: str, request: Any, code: grpc.StatusCode, start: float) -> None:
        self.metrics.request_duration.labels(rpc, self.model_of(request), code.name).observe(
            time.perf_counter() - start
        )
