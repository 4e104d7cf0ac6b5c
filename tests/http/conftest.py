"""The real gateway (gRPC server, interceptor, metrics, HTTP front) over a fake TorchServe,
reached with a real HTTP client on loopback: the HTTP path without Java."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from service.gateway.http.app import HttpSettings
from service.gateway.http.front import HttpFront
from service.gateway.server import Gateway
from tests.gateway.conftest import channel, gateway, options, script, stub  # the same stack

__all__ = ["channel", "gateway", "options", "script", "stub"]

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
