"""Load on the served model: gRPC clients, the engine in process, CPU per component."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psutil

from bench.e2e import METHOD
from bench.e2e.clients import SPAWN_ALLOWANCE_S, ClientProcess, call_loop
from bench.e2e.servers import worker_processes
from service._proto.saliency.v1 import saliency_pb2 as pb
from service.archive import BatchConfig
from service.client import SaliencyClient
from service.launcher import TorchServe
from service.serving.pipeline import Explainer


def make_requests(n: int, size: int) -> list[pb.ExplainRequest]:
    """Held-out synthetic images as PNG bytes, each an Explain request as a client sends it."""
    import cv2

    from service.models.synthetic import generate

    batch = generate(n, seed=777_000, size=size)
    requests = []
    for image in batch.images:
        ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok
        requests.append(SaliencyClient.request(data.tobytes(), methods=[METHOD], top_k=1))
    return requests


@dataclass
class Load:
    """What ``clients`` concurrent callers achieved in a measured window."""

    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    completed: int = 0  # calls that ended inside the window (throughput)
    errors: int = 0
    apart: bool = False  # the clients ran in a process of their own (not the gateway's)
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per component, in window

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


CpuProbe = Callable[[], dict[str, float]]


def grpc_load(
    address: str,
    requests: Sequence[pb.ExplainRequest],
    clients: int,
    seconds: float,
    warmup: float,
    probe: CpuProbe | None = None,
    apart: ClientProcess | None = None,
) -> Load:
    """``clients`` threads, one channel each, calling Explain back to back.

    Throughput counts the calls that end inside the window ``[warmup, warmup + seconds]``;
    latencies are those of calls that start inside it. ``probe`` (CPU seconds per
    component) is read at both ends of the window. The threads run in ``apart`` when
    given (whose CPU is then the "clients" component), else in this process, the
    gateway's (and their CPU is counted as the gateway's).
    """
    start = time.monotonic() + (SPAWN_ALLOWANCE_S if apart is not None else 0.0)
    window = (start + warmup, start + warmup + seconds)
    result = Load(clients, seconds, apart=apart is not None)
    with ThreadPoolExecutor(1) as runner:
        if apart is not None:
            calls = runner.submit(apart.run, address, requests, clients, window)
        else:
            calls = runner.submit(lambda: (call_loop(address, requests, clients, window[1]), 0.0))
        if probe is not None:
            time.sleep(max(0.0, window[0] - time.monotonic()))
            first = probe()
            time.sleep(max(0.0, window[1] - time.monotonic()))
            last = probe()
            result.cpu_seconds = {k: last[k] - first.get(k, 0.0) for k in last}
        made, clients_cpu = calls.result()
    if apart is not None:
        result.cpu_seconds["clients"] = clients_cpu
    for began, ended, ok in made:
        if window[0] <= ended <= window[1]:
            result.completed += ok
            result.errors += not ok
        if ok and window[0] <= began and ended <= window[1] + 60:
            result.latencies.append(ended - began)
    return result


def cpu_probe(ts: TorchServe) -> CpuProbe:
    """CPU seconds used so far by the bench process, TorchServe's frontend and its workers."""

    def total(processes: Sequence[psutil.Process]) -> float:
        seconds = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                seconds += times.user + times.system
            except psutil.Error:
                continue
        return seconds

    def probe() -> dict[str, float]:
        workers = worker_processes(ts)
        worker_pids = {w.pid for w in workers}
        tree: list[psutil.Process] = []
        if ts.process is not None:
            root = psutil.Process(ts.process.pid)
            tree = [root, *root.children(recursive=True)]
        frontend = [p for p in tree if p.pid not in worker_pids]
        return {
            "gateway": total([psutil.Process()]),
            "TorchServe frontend": total(frontend),
            "worker": total(workers),
        }

    return probe


def inprocess_load(
    explainer: Explainer, requests: Sequence[pb.ExplainRequest], batch: int, seconds: float
) -> Load:
    """Batches of ``batch`` requests through the pipeline, back to back (after one warm-up)."""
    explainer.explain_batch(list(requests[:batch]))
    result = Load(1, seconds)
    n = 0
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [requests[(n + i) % len(requests)] for i in range(batch)]
        n += batch
        began = time.perf_counter()
        replies = explainer.explain_batch(chunk)
        took = time.perf_counter() - began
        result.errors += sum(1 for r in replies if r.HasField("error"))
        result.latencies.extend([took] * batch)
        result.completed += batch
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = {"in process": sum(me.cpu_times()[:2]) - cpu_before}
    return result


def show(label: str, load: Load) -> Load:
    """Print one measurement as it lands (a long run shows its progress)."""
    print(
        f"   {label}: {load.throughput:.1f} req/s, p50 {load.percentile(50) * 1e3:.1f} ms, "
        f"errors {load.errors}",
        flush=True,
    )
    return load


@dataclass
class Paired:
    """One paired round: in process, then gRPC with the clients apart and in the gateway's
    process, back to back."""

    alone: Load
    apart: Load
    shared: Load


@dataclass
class Sweep:
    config: BatchConfig
    deploy_seconds: float
    loads: dict[int, Load]
