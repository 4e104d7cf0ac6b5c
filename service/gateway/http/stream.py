"""Server-sent events over ``ExplainStream``: one event per stream part, as it arrives.

Each ``ExplainStreamResponse`` becomes ``event: <its oneof field>`` with its JSON as
``data`` (:func:`~service.gateway.http.kserve.stream_part_json`): ``prediction`` first,
then ``explanation`` and ``scores`` as they complete, then ``summary``; a part kind added
to the proto later goes out under its own name, encoded generically. A failure after the
first event is an ``error`` event (``{"error": {...}, "status": <HTTP status>}``), since
the response's status has gone by then; a failure before it is an ordinary JSON error.

The client going away cancels the gRPC call, which stops the model worker's job: the
response watches for the disconnect itself rather than waiting for a write to fail,
which could be many seconds away while a slow method runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import grpc
from starlette.types import Receive, Scope, Send

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.gateway.http.calls import error_body
from service.gateway.http.replies import stream_part_json
from service.protocol.errors import http_status

HEARTBEAT_S = 15.0
"""A comment line this often keeps proxies from closing a quiet stream (slow methods)."""
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and the like: pass each event on at once
]


def sse(event: str, data: Any) -> bytes:
    """One event; ``data`` is JSON on one line (JSON escapes every newline)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStream:
    """An ASGI response that streams the parts of a started ``ExplainStream`` call.

    Args:
        call: the call, its first part already read (so that an early failure could
            still be a plain error response).
        first: that part.
    """

    def __init__(self, call: Any, first: pb.ExplainStreamResponse) -> None:
        self.call = call
        self.first = first
        self._lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        pump = asyncio.create_task(self._pump(send))
        gone = asyncio.create_task(_disconnected(receive))
        beat = asyncio.create_task(self._heartbeat(send))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, gone, beat):
                task.cancel()
            self.call.cancel()  # a no-op once the call has ended
            await asyncio.gather(pump, gone, beat, return_exceptions=True)
        if pump.done() and not pump.cancelled() and pump.exception() is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _write(self, send: Send, chunk: bytes) -> None:
        async with self._lock:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _pump(self, send: Send) -> None:
        part: Any = self.first
        try:
            while part is not grpc.aio.EOF:
                await self._write(send, sse(*stream_part_json(part)))
                part = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            body = {**error_body(code, exc.details() or code), "status": http_status(code)}
            await self._write(send, sse("error", body))

    async def _heartbeat(self, send: Send) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._write(send, b": keep-alive\n\n")


async def _disconnected(receive: Receive) -> None:
    with contextlib.suppress(OSError):
        while (await receive())["type"] != "http.disconnect":
            pass
