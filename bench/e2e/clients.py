"""The benchmark's gRPC callers: threads calling Explain back to back, here or in a process
of their own.

The gateway under test runs in the benchmark's process (an asyncio loop in a thread,
:func:`service.stack.running_gateway`). Client threads in that process would contend with
the gateway's loop for the GIL and count their CPU as the gateway's: a cost no deployment
has, its clients being elsewhere. :class:`ClientProcess` runs them in a spawned process
instead (same machine, so their CPU still competes for the cores; it is measured apart).
Window times are ``time.monotonic()``: Linux's CLOCK_MONOTONIC, the same in every process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from types import TracebackType

import grpc
import psutil

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc

Call = tuple[float, float, bool]  # began, ended (time.monotonic), succeeded
SPAWN_ALLOWANCE_S = 0.3  # a submitted load reaches the client process within this


def call_loop(
    address: str, requests: Sequence[pb.ExplainRequest], clients: int, until: float
) -> list[Call]:
    """``clients`` threads, one channel each, calling Explain back to back until ``until``."""
    calls: list[Call] = []  # list.append is atomic under the GIL

    def client(index: int) -> None:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.ExplainServiceStub(channel)
        n = index
        try:
            while time.monotonic() < until:
                request = requests[n % len(requests)]
                n += clients
                began = time.monotonic()
                try:
                    stub.Explain(request, timeout=60)
                    ok = True
                except grpc.RpcError:
                    ok = False
                calls.append((began, time.monotonic(), ok))
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return calls


def _cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _calls_apart(
    address: str, payloads: Sequence[bytes], clients: int, window: tuple[float, float]
) -> tuple[list[Call], float]:
    """In the client process: the calls, and its own CPU seconds inside ``window``."""
    requests = [pb.ExplainRequest.FromString(p) for p in payloads]
    marks: list[float] = []

    def mark() -> None:
        for edge in window:
            time.sleep(max(0.0, edge - time.monotonic()))
            marks.append(_cpu_seconds())

    marker = threading.Thread(target=mark)
    marker.start()
    calls = call_loop(address, requests, clients, window[1])
    marker.join()
    return calls, marks[1] - marks[0]


class ClientProcess:
    """One spawned process that runs each load's client threads in turn (a context manager)."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
        self._pool.submit(_cpu_seconds).result(120)  # started and imported before any window

    def run(
        self,
        address: str,
        requests: Sequence[pb.ExplainRequest],
        clients: int,
        window: tuple[float, float],
    ) -> tuple[list[Call], float]:
        """The calls made in ``window`` and the process's CPU seconds inside it."""
        payloads = [r.SerializeToString() for r in requests]
        future = self._pool.submit(_calls_apart, address, payloads, clients, window)
        return future.result(timeout=window[1] - time.monotonic() + 120)

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
