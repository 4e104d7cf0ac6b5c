"""An in-process stand-in for TorchServe's gRPC inference API, on a free loopback port.

It answers ``Predictions`` and ``StreamPredictions`` with whatever the test sets in
``replies`` (serialized saliency messages, or a gRPC status to abort with), records every
request it got, and reports healthy on ``Ping``: the gateway in front of it is the real
one, so its servicer, interceptor, metrics and upstream client run as in production.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from service._proto.torchserve import inference_pb2 as ts_pb
from service._proto.torchserve import inference_pb2_grpc as ts_grpc

Reply = bytes | tuple[grpc.StatusCode, str]
"""A serialized message, or the status to abort the call with."""


@dataclass
class Script:
    """What the fake answers: per input key, a function of the request to a reply."""

    unary: dict[str, Callable[[ts_pb.PredictionsRequest], Reply]] = field(default_factory=dict)
    stream: Callable[[ts_pb.PredictionsRequest], list[Reply]] | None = None
    hang_stream: asyncio.Event | None = None
    hold: dict[str, threading.Event] = field(default_factory=dict)
    """Per TorchServe model name: calls to it wait until the event is set (a busy pool)."""
    received: list[ts_pb.PredictionsRequest] = field(default_factory=list)

    def waiting(self, count: int, timeout: float = 10.0) -> None:
        """Return once ``count`` requests were received (they may be held)."""
        end = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self.received)} of {count} requests arrived")
            time.sleep(0.01)


class _Servicer(ts_grpc.InferenceAPIsServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def Ping(
        self, request: object, context: grpc.aio.ServicerContext
    ) -> ts_pb.TorchServeHealthResponse:  # type: ignore[override]
        return ts_pb.TorchServeHealthResponse(health='{"status": "Healthy"}')

    async def Predictions(  # type: ignore[override]
        self, request: ts_pb.PredictionsRequest, context: grpc.aio.ServicerContext
    ) -> ts_pb.PredictionResponse:
        key = next(
            k for k in ("request", "predict", "model_info", "concepts") if k in request.input
        )
        held = self.script.hold.get(request.model_name)
        if key not in self.script.unary and key == "model_info":  # the gateway's health probe
            while held is not None and not held.is_set():
                await asyncio.sleep(0.01)
            return ts_pb.PredictionResponse(prediction=b"")
        self.script.received.append(request)
        while held is not None and not held.is_set():
            await asyncio.sleep(0.01)
        reply = self.script.unary[key](request)
        if isinstance(reply, tuple):
            await context.abort(*reply)
        return ts_pb.PredictionResponse(prediction=reply)  # type: ignore[arg-type]

    async def StreamPredictions(  # type: ignore[override]
        self, request: ts_pb.PredictionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ts_pb.PredictionResponse]:
        self.script.received.append(request)
        assert self.script.stream is not None
        for reply in self.script.stream(request):
            if isinstance(reply, tuple):
                await context.abort(*reply)
            yield ts_pb.PredictionResponse(prediction=reply)  # type: ignore[arg-type]
        if self.script.hang_stream is not None:
            await self.script.hang_stream.wait()


@contextmanager
def fake_torchserve(script: Script) -> Iterator[str]:
    """The fake, serving on its own event loop in a thread; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-torchserve", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        ts_grpc.add_InferenceAPIsServiceServicer_to_server(_Servicer(script), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
