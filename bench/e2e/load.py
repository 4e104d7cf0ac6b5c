"""Load on the served model: gRPC clients, the engine in process, CPU per component."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import psutil

from bench.e2e import METHOD
from bench.e2e.servers import worker_processes
from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
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
) -> Load:
    """``clients`` threads, one channel each, calling Explain back to back.

    Throughput counts the calls that end inside the window ``[warmup, warmup + seconds]``;
    latencies are those of calls that start inside it. ``probe`` (CPU seconds per
    component) is read at both ends of the window.
    """
    start = time.perf_counter()
    window = (start + warmup, start + warmup + seconds)
    result = Load(clients, seconds)
    calls: list[tuple[float, float, bool]] = []  # list.append is atomic under the GIL

    def client(index: int) -> None:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.ExplainServiceStub(channel)
        n = index
        try:
            while time.perf_counter() < window[1]:
                request = requests[n % len(requests)]
                n += clients
                began = time.perf_counter()
                try:
                    stub.Explain(request, timeout=60)
                    ok = True
                except grpc.RpcError:
                    ok = False
                calls.append((began, time.perf_counter(), ok))
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    if probe is not None:
        time.sleep(max(0.0, window[0] - time.perf_counter()))
        first = probe()
        time.sleep(max(0.0, window[1] - time.perf_counter()))
        last = probe()
        result.cpu_seconds = {k: last[k] - first.get(k, 0.0) for k in last}
    for thread in threads:
        thread.join()
    for began, ended, ok in calls:
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
            "clients + gateway": total([psutil.Process()]),
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
class Sweep:
    config: BatchConfig
    deploy_seconds: float
    loads: dict[int, Load]
