"""What the gateway tests share: the served model's name, a request, metric counts."""

from __future__ import annotations

import time

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.gateway.server import Gateway

MODEL = "tiny"


def request(model: str = "") -> pb.ExplainRequest:
    return pb.ExplainRequest(model=model, image=pb.Image(encoded=b"png bytes"))


def calls(
    gateway: Gateway, rpc: str, code: str, model: str = MODEL, *, expect: float = 1.0
) -> float:
    """Calls counted with these labels; waits (up to 5 s) for ``expect`` of them, as the
    interceptor records a call after its status has gone out."""
    labels = {"method": rpc, "model": model, "code": code}
    deadline = time.monotonic() + 5.0
    while True:
        value = gateway.metrics.registry.get_sample_value(
            "saliency_request_duration_seconds_count", labels
        )
        if (value or 0.0) >= expect or time.monotonic() > deadline:
            return value or 0.0
        time.sleep(0.02)


def reply_with(message: pb.ExplainResponse) -> bytes:
    return message.SerializeToString()
