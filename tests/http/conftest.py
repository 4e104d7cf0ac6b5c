"""The real gateway (gRPC server, interceptor, metrics, HTTP front) over a fake TorchServe,
reached with a real HTTP client on loopback: the HTTP path without Java."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from service.gateway.http.app import HttpSettings
from service.gateway.http.front import HttpFront
from service.gateway.server import Gateway
from tests.gateway.test_gateway import gateway, script  # the fixtures: the same stack

__all__ = ["gateway", "script"]

MODEL = "tiny"  # the gateway tests' served model
IMAGE = b"\x89PNG not really: the gateway never decodes images"


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    assert gateway.http is not None
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.http.port}", timeout=30) as client:
        yield client


def body(image: bytes = IMAGE, **parameters: object) -> dict[str, object]:
    """A KServe v1 body with one instance."""
    return {
        "instances": [{"image": {"b64": base64.b64encode(image).decode()}}],
        "parameters": parameters,
    }


def calls(gateway: Gateway, rpc: str, code: str, *, expect: float = 1.0) -> float:
    """Calls in the gateway's latency histogram with these labels; waits (up to 5 s) for
    ``expect`` of them, as the interceptor records a call just after its status went out."""
    labels = {"method": rpc, "model": MODEL, "code": code}
    deadline = time.monotonic() + 5.0
    while True:
        value = gateway.metrics.registry.get_sample_value(
            "saliency_request_duration_seconds_count", labels
        )
        if (value or 0.0) >= expect or time.monotonic() > deadline:
            return value or 0.0
        time.sleep(0.02)


@contextmanager
def http_front(settings: HttpSettings, target: str) -> Iterator[HttpFront]:
    """An HTTP front with ``settings`` calling the gRPC server at ``target``, on a loop of
    its own in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="http-front", daemon=True)
    thread.start()
    front = HttpFront("127.0.0.1", 0, settings, target=target)
    try:
        asyncio.run_coroutine_threadsafe(front.start(), loop).result(30)
        yield front
    finally:
        asyncio.run_coroutine_threadsafe(front.stop(grace=1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
