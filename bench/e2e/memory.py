"""The worker's resident memory over a sustained run."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil

from bench.e2e.clients import ClientProcess
from bench.e2e.load import Load, grpc_load
from bench.e2e.servers import worker_processes
from service._proto.saliency.v1 import saliency_pb2 as pb
from service.launcher import TorchServe


def sample_rss(processes: Sequence[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


@dataclass
class Memory:
    """Worker RSS sampled while 8 clients keep it busy."""

    times: list[float]
    rss_mib: list[float]
    requests: int

    def _settled(self) -> tuple[np.ndarray, np.ndarray]:
        # The first tenth is warm-up (allocator pools, lazily built kernels), not growth.
        t, rss = np.array(self.times), np.array(self.rss_mib)
        keep = t >= 0.1 * t[-1] if len(t) else t.astype(bool)
        return t[keep], rss[keep]

    @property
    def slope_mib_per_min(self) -> float:
        t, rss = self._settled()
        if len(t) < 3:
            return float("nan")
        slope, _ = np.polyfit(t / 60.0, rss, 1)
        return float(slope)

    @property
    def growth_mib(self) -> float:
        """Mean of the last quarter of the settled samples minus the mean of the first."""
        _, rss = self._settled()
        quarter = max(1, len(rss) // 4)
        return float(rss[-quarter:].mean() - rss[:quarter].mean()) if len(rss) else float("nan")


def sustained(
    ts: TorchServe,
    address: str,
    requests: Sequence[pb.ExplainRequest],
    minutes: float,
    apart: ClientProcess | None = None,
) -> Memory:
    """8 clients for ``minutes``; worker RSS sampled every few seconds while they run."""
    workers = worker_processes(ts)
    memory = Memory([], [], 0)
    done = threading.Event()
    result: list[Load] = []
    seconds = minutes * 60.0

    def drive() -> None:
        try:
            result.append(grpc_load(address, requests, 8, seconds, 0.0, apart=apart))
        finally:
            done.set()

    thread = threading.Thread(target=drive)
    start = time.perf_counter()
    thread.start()
    interval = max(1.0, min(10.0, seconds / 40))
    while not done.wait(interval):
        memory.times.append(time.perf_counter() - start)
        memory.rss_mib.append(sample_rss(workers))
    thread.join()
    memory.requests = result[0].completed if result else 0
    return memory
