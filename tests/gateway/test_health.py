"""Health says whether a request can be answered now, per pool, over the fake TorchServe.

A pool whose workers hold every request (frozen, or busy past ``stale_after_s``) is
NOT_SERVING although the frontend answers ``Ping``; a frontend that is gone is
NOT_SERVING at the next check. (Real TorchServe: ``tests/integration/test_faults.py``.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gateway.server import Gateway
from service.stack import running_gateway
from tests.gateway.fake_torchserve import Script, fake_torchserve
from tests.gateway.support import MODEL

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "saliency.v1.ExplainService", MODEL, f"{MODEL}/explain", f"{MODEL}/predict")


@pytest.fixture
def options() -> dict[str, Any]:
    return {"health_interval_s": 0.1, "health_stale_after_s": 1.0}


def statuses(channel: grpc.Channel) -> dict[str, int]:
    health = health_pb2_grpc.HealthStub(channel)
    return {
        name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        for name in SERVICES
    }


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "the state was not reached"
        time.sleep(0.05)


def test_a_frozen_pool_is_not_serving_although_the_frontend_answers(
    gateway: Gateway, channel: grpc.Channel, script: Script
) -> None:
    assert set(statuses(channel).values()) == {SERVING}
    frozen = threading.Event()
    script.hold[f"{MODEL}--predict"] = frozen  # Ping answers; the pool's workers do not
    eventually(lambda: statuses(channel)[f"{MODEL}/predict"] == NOT_SERVING)
    now = statuses(channel)
    assert now[f"{MODEL}/explain"] == SERVING
    assert now[MODEL] == now[""] == now["saliency.v1.ExplainService"] == NOT_SERVING
    assert gateway.metrics.upstream_ready._value.get() == 0  # type: ignore[attr-defined]
    frozen.set()  # the held probe is answered: back at once
    eventually(lambda: set(statuses(channel).values()) == {SERVING})


def test_a_gone_frontend_is_not_serving_at_the_next_check(options: dict[str, Any]) -> None:
    fake = fake_torchserve(Script())
    upstream = fake.__enter__()
    with (
        running_gateway(upstream, [MODEL], **options) as started,
        grpc.insecure_channel(started.address) as channel,
    ):
        assert set(statuses(channel).values()) == {SERVING}
        fake.__exit__(None, None, None)
        eventually(lambda: set(statuses(channel).values()) == {NOT_SERVING})
