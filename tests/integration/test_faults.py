"""Faults and load against real TorchServe: fairness (finding 5), codes under overload and
worker death (8, 15), health that tells the truth (2).

Supervision by ``serve`` (finding 13) is in ``test_supervision.py``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.chaos.load import stream_burst
from bench.chaos.processes import worker_pids
from service.client import SaliencyClient, explain_request
from service.launcher import TorchServe
from service.stack import Stack, gateway_options, running_gateway

pytestmark = pytest.mark.integration
Samples = list[tuple[bytes, int, object]]


def eventually(check: Callable[[], bool], timeout: float = 120.0, pause: float = 0.1) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "the state was not reached"
        time.sleep(pause)
    return time.monotonic() - start


def test_predict_never_waits_behind_explanations(client: SaliencyClient, samples: Samples) -> None:
    data, label, _ = samples[7]
    # Sobol on 3 targets with its design before issue 13 (the default is 10x cheaper): ~20 s
    # of work per request (test_serving). One request per batch,
    # so that each explain worker holds one.
    slow = []
    for _ in range(2):
        request = explain_request(
            data, methods=[("sobol", {"grid_size": 8, "n_designs": 32})], top_k=3
        )
        slow.append(client.stub.Explain.future(request, timeout=120))
        time.sleep(0.5)
    try:
        assert client.predict(data, timeout=60).predictions[0].index == label
        # Answered while both explanations still run: it did not queue behind them.
        assert not any(call.done() for call in slow)
    finally:
        for call in slow:
            call.cancel()


def test_a_stream_burst_gets_answers_or_retryable_refusals(
    torchserve: TorchServe, samples: Samples
) -> None:
    """Finding 15: 867 of 1,000 streams got INTERNAL "Model has no worker"."""
    options = {**gateway_options(torchserve), "max_in_flight": {"explain": 8}}
    with running_gateway(torchserve.grpc_address, ["shapes"], **options) as small:
        # SmoothGrad: long enough that the calls overlap however fast this machine is.
        counted = stream_burst(small.address, samples[0][0], calls=120, method="smoothgrad")
        assert set(counted) == {"OK", "RESOURCE_EXHAUSTED"}, counted
        assert small.gateway.admission.in_flight[("shapes", "explain")] == 0


def test_a_full_torchserve_queue_is_a_retryable_resource_exhausted(
    small_torchserve: TorchServe, samples: Samples
) -> None:
    """Finding 8: a full queue gave INTERNAL "use scale workers API". Here the gateway's
    own bound is far above TorchServe's queue of 2, so TorchServe's refusal is what shows."""
    options = {**gateway_options(small_torchserve), "max_in_flight": {"explain": 1000}}
    with running_gateway(small_torchserve.grpc_address, ["shapes"], **options) as front:
        counted = stream_burst(front.address, samples[0][0], calls=24, method="smoothgrad")
    assert set(counted) == {"OK", "RESOURCE_EXHAUSTED"}, counted


def test_killing_a_worker_under_load_loses_no_request(
    scratch_stack: Stack, samples: Samples
) -> None:
    """Finding 8 (a dead worker: INTERNAL or RESOURCE_EXHAUSTED with a Java class name) and
    "faults cost no answers": 8 clients, one explain worker SIGKILLed mid-run."""
    torchserve, gateway = scratch_stack.torchserve, scratch_stack.gateway
    before = worker_pids(torchserve, "shapes")
    retries = gateway.gateway.upstream.retries
    failures: list[str] = []
    done = threading.Event()

    def client_loop(index: int) -> None:
        data = samples[index % len(samples)][0]
        with SaliencyClient(gateway.address) as client:
            while not done.is_set():
                try:
                    client.explain(data, methods=["smoothgrad"], timeout=120)
                    client.predict(data, timeout=60)
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3.0)  # every worker busy
        os.kill(before[0], signal.SIGKILL)
        eventually(lambda: len(worker_pids(torchserve, "shapes")) == len(before))
        time.sleep(2.0)  # and more calls on the restarted worker
    finally:
        done.set()
        for thread in threads:
            thread.join(180)
    assert failures == []
    assert before[0] not in worker_pids(torchserve, "shapes")
    # The calls the dead worker held were sent again, not lost (and not counted twice).
    assert gateway.gateway.upstream.retries > retries


@pytest.fixture
def stopped_predict_pool(scratch_stack: Stack) -> Iterator[list[int]]:
    """The forward-only pool's workers frozen (SIGSTOP): alive for the OS and for TorchServe's
    management API, answering nothing. Thawed after the test."""
    torchserve = scratch_stack.torchserve
    pids = worker_pids(torchserve, "shapes--predict")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_health_is_not_serving_while_no_worker_can_answer(
    scratch_stack: Stack, stopped_predict_pool: list[int]
) -> None:
    """Finding 2: health said SERVING with no live worker, on the management API's word."""
    torchserve = scratch_stack.torchserve
    options = {**gateway_options(torchserve), "health_stale_after_s": 2.0}
    with (
        running_gateway(
            torchserve.grpc_address, ["shapes"], health_interval_s=0.25, **options
        ) as front,
        grpc.insecure_channel(front.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return health.Check(request, timeout=10).status

        NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
        eventually(lambda: status("shapes/predict") == NOT_SERVING, timeout=30)
        assert status("") == status("shapes") == NOT_SERVING
        assert status("shapes/explain") == health_pb2.HealthCheckResponse.SERVING
        # What the old check believed: every frozen worker READY (and running, for the OS).
        described = torchserve.management("GET", "/models/shapes--predict")[0]["workers"]
        assert {w["status"] for w in described} == {"READY"}
        assert worker_pids(torchserve, "shapes--predict") == sorted(stopped_predict_pool)
        for pid in stopped_predict_pool:
            os.kill(pid, signal.SIGCONT)
        eventually(lambda: status("") == health_pb2.HealthCheckResponse.SERVING, timeout=60)
