"""The worker's side of TorchServe 0.12, real, and a model of its Java frontend's rules.

``handle`` runs a batch through TorchServe's own ``ts.service.Service.predict`` (the
code its worker runs): the batch in the frontend's wire form, the intermediate messages
caught on the worker's socket, the final message as ``predict`` writes it from
``context.request_ids`` and the handler's list. ``Batch.survives`` then replays every message
through the rules ``GRPCJob``, ``RestJob`` and ``BatchAggregator`` apply (see
``handlers/outbox.py``); a sequence that would throw there is a failed assertion here.
The real frontend is exercised in ``tests/integration/test_worker_safety.py``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.service import Service

from handlers.saliency_handler import SaliencyHandler

Call = Literal["unary", "stream", "http"]


@dataclass
class Part:
    """One request's entry in one message."""

    request_id: str
    headers: dict[str, str]
    payload: bytes
    message: int  # which message of the batch (the last one is the final message)


class Socket:
    """Where the worker writes its intermediate messages."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))


def context(model_dir: Path, calls: list[Call]) -> Context:
    ctx = Context("tiny", str(model_dir), {}, len(calls), None, "0.12.0", model_yaml_config={})
    ctx.request_ids = {i: f"request-{i}" for i in range(len(calls))}
    # An HTTP request reaches the worker with its HTTP headers; a gRPC one with none.
    http = {"Host": "127.0.0.1:8080", "User-Agent": "curl/8"}
    ctx.request_processor = [RequestProcessor(http if c == "http" else {}) for c in calls]
    ctx.cl_socket = Socket()  # type: ignore[attr-defined]
    return ctx


def decode(message: bytes, index: int) -> list[Part]:
    """The entries of one worker -> frontend message (``create_predict_response``'s layout)."""
    offset = 0

    def integer() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("!i", message, offset)
        offset += 4
        return int(value)

    def chunk() -> bytes:
        nonlocal offset
        size = integer()
        data = message[offset : offset + size]
        offset += size
        return data

    integer()  # status code
    chunk()  # message
    parts = []
    while True:
        size = integer()
        if size == -1:
            return parts
        request_id = message[offset : offset + size].decode()
        offset += size
        chunk()  # content type
        integer()  # HTTP status
        chunk()  # reason phrase
        headers = {chunk().decode(): chunk().decode() for _ in range(integer())}
        parts.append(Part(request_id, headers, chunk(), index))


@dataclass
class Batch:
    """What the frontend received for one batch: every message, decoded."""

    calls: list[Call]
    messages: list[list[Part]] = field(default_factory=list)

    def of(self, index: int) -> list[Part]:
        """Everything request ``index`` received, in order."""
        return [p for m in self.messages for p in m if p.request_id == f"request-{index}"]

    def reply(self, index: int) -> bytes:
        """The one payload a unary call received (its call completes on it)."""
        [part] = self.of(index)
        return part.payload

    def early(self, index: int) -> bool:
        return any(p.message < len(self.messages) - 1 for p in self.of(index))

    def survives(self) -> None:
        """The frontend's rules hold for every message (``handlers/outbox.py``, 1-2)."""
        *intermediate, final = self.messages
        for message in intermediate:
            # BatchAggregator: a message without a "true" part would close the batch.
            assert any(p.headers.get("ts_stream_next") == "true" for p in message), message
        assert all(p.headers.get("ts_stream_next") != "true" for p in final), final
        for index, call in enumerate(self.calls):
            parts = self.of(index)
            if call == "unary":  # completes on its first part: a second would throw
                assert len(parts) <= 1, parts
            elif call == "stream":  # GRPCJob reads the header of every part
                assert all("ts_stream_next" in p.headers for p in parts), parts
                assert [p.headers["ts_stream_next"] for p in parts[:-1]] == ["true"] * (
                    len(parts) - 1
                )
                assert not parts or parts[-1].headers["ts_stream_next"] == "false"
            else:  # RestJob: no stream header, or "true" parts then one "false"
                flags = [p.headers.get("ts_stream_next") for p in parts]
                assert flags in ([None], []) or (flags[-1] == "false" and "true" in flags)


HTTP_HEADERS = [{"name": b"Host", "value": b"127.0.0.1:8080"}]


def wire_batch(items: list[dict[str, Any]], calls: list[Call]) -> list[dict[str, Any]]:
    """The batch as the frontend encodes it: an HTTP request brings its HTTP headers."""
    batch = []
    for index, (item, call) in enumerate(zip(items, calls, strict=True)):
        parameters = [
            {"name": name, "value": value, "contentType": None} for name, value in item.items()
        ]
        entry = {"requestId": f"request-{index}".encode(), "parameters": parameters}
        if call == "http":
            entry["headers"] = HTTP_HEADERS
        batch.append(entry)
    return batch


def handle(
    handler: SaliencyHandler, model_dir: Path, items: list[dict[str, Any]], calls: list[Call]
) -> Batch:
    """Run one batch as TorchServe's worker does and decode what reached the frontend."""
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    service = Service("tiny", str(model_dir), None, handler.handle, None, len(items), True, metrics)
    socket = Socket()
    service.set_cl_socket(socket)
    final = service.predict(wire_batch(items, calls))
    sent = [*socket.sent, final]
    batch = Batch(calls, [decode(m, i) for i, m in enumerate(sent)])
    assert decode_code(final) == 200, "the handler failed its whole batch"
    batch.survives()
    return batch


def decode_code(message: bytes) -> int:
    return int(struct.unpack_from("!i", message, 0)[0])
