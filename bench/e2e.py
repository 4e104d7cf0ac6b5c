"""End to end over gRPC (gateway -> TorchServe -> engine) against the engine in process.

Run ``python -m bench.e2e`` (``make bench`` runs it too). It builds the default model's
archive, starts a real TorchServe on free loopback ports and the gateway in a background
asyncio thread, and measures, with Explain requests for ``vanilla_gradient`` on held-out
synthetic images:

* the in-process baseline: :class:`service.serving.pipeline.Explainer` over
  :func:`service.runtime.artifacts.load_bundle` on the same archive's files, batches of 1
  of 8 and of 16, one after another on every core (the bar compares with the best of them);
* throughput (requests/s) and latency at 1, 8 and 16 concurrent clients over gRPC, and
  the p50 overhead at 1 client in milliseconds;
* TorchServe's batch size, batch delay and worker count: a sweep, each configuration
  registered in turn on the same TorchServe through its management API, throughput at 8
  and 16 clients; dynamic batching is the default batch size against batch 1 (same
  workers) at 16 clients;
* the worker's resident memory over a sustained run (``--minutes``, 1 by default; 10 for
  the growth check of the issue), with its slope.

Every figure comes from this run. Writes ``bench/results/e2e.md``; exits 1 on a missed bar
only with ``--strict`` (so that ``bench.run`` goes on).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import torch

from bench.machine import add_omp_policy_argument, cpu_model, rerun_with_omp_policy, write_report
from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.archive import BatchConfig
from service.client import SaliencyClient
from service.gateway.server import Gateway, GatewayConfig, gateway_in_thread
from service.launcher import TorchServe, TorchServePorts, write_config
from service.runtime.artifacts import load_bundle
from service.runtime.onnx_forward import cpu_quota
from service.serving.pipeline import Explainer

MODULE = "bench.e2e"
RESULTS = Path(__file__).resolve().parent / "results" / "e2e.md"
MODEL = "shapes"
METHOD = "vanilla_gradient"
THROUGHPUT_BAR = 0.8  # e2e at 8 clients / in process
BATCHING_BAR = 1.5  # 16 clients: the default batch size / batch 1
GROWTH_BAR_MIB = 10.0  # worker RSS growth over the sustained run counted as "no growth"
COMPONENTS = ("clients + gateway", "TorchServe frontend", "worker")
SWEEP = (
    # batch 1 with the default's delay and workers: the dynamic batching bar's reference,
    # and the transport overhead at 1 client without TorchServe's batch-fill wait
    BatchConfig(batch_size=1),
    BatchConfig(batch_size=2),
    BatchConfig(batch_size=8),
    BatchConfig(batch_size=4, max_batch_delay_ms=5),
    # one worker with every core, as before the split (threads = CPU quota / workers)
    BatchConfig(batch_size=1, workers=1),
    BatchConfig(batch_size=4, workers=1),
    BatchConfig(batch_size=8, workers=1),
    BatchConfig(batch_size=16, workers=1),
)


def config_name(config: BatchConfig) -> str:
    name = f"b{config.batch_size}-d{config.max_batch_delay_ms}-w{config.workers}"
    return name + (f"-t{config.threads}" if config.threads else "")


# -- archive and servers ------------------------------------------------------------------


def build_base_archive(store: Path, config: BatchConfig) -> tuple[Path, str]:
    """The default model's archive, or the default architecture untrained if it cannot train."""
    from service.archive import build_archive, build_default_archive

    try:
        return build_default_archive(store, batch=config), "default model (trained weights)"
    except Exception as error:  # no cached model and no time to train: same architecture
        print(f"default archive failed ({type(error).__name__}: {error}); untrained", flush=True)
        from service.models import synthetic
        from service.models.net import DEFAULT_TARGET_LAYER, SaliencyNet

        torch.manual_seed(0)
        weights = store / "weights.pt"
        net = SaliencyNet(num_classes=len(synthetic.CLASS_NAMES))
        torch.save(net.state_dict(), weights)
        size = synthetic.IMAGE_SIZE
        mar = build_archive(
            name=MODEL,
            eager={
                "module": "service.models.net",
                "class": "SaliencyNet",
                "kwargs": {"num_classes": len(synthetic.CLASS_NAMES)},
                "weights": "weights.pt",
            },
            exported=None,
            labels=synthetic.CLASS_NAMES,
            input_size=(3, size, size),
            mean=[0.5] * 3,
            std=[0.25] * 3,
            target_layer=DEFAULT_TARGET_LAYER,
            out_dir=store,
            files=[weights],
            batch=config,
        )
        return mar, "default architecture (untrained weights)"


def variant(base: Path, config: BatchConfig) -> Path:
    """A copy of ``base`` whose ``model-config.yaml`` is ``config`` (files otherwise equal)."""
    out = base.with_name(f"{MODEL}-{config_name(config)}.mar")
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "model-config.yaml":
                data = config.yaml().encode()
            dst.writestr(item, data)
    return out


def management(ts: TorchServe, method: str, path: str, timeout: float = 300.0) -> dict[str, object]:
    url = f"http://127.0.0.1:{ts.ports.management}{path}"
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        body = reply.read()
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {"items": parsed}


def deploy(ts: TorchServe, mar: Path, config: BatchConfig) -> float:
    """Serve ``mar`` as ``MODEL`` with ``config`` (replacing what was there); seconds taken."""
    start = time.perf_counter()
    try:
        described = management(ts, "GET", f"/models/{MODEL}").get("items", [])
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
        described = []
    for entry in described if isinstance(described, list) else []:
        # Unregistering needs the version: DELETE /models/<name> answers 405.
        management(ts, "DELETE", f"/models/{MODEL}/{entry['modelVersion']}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # unregistering stops the workers asynchronously
        try:
            management(ts, "GET", f"/models/{MODEL}")
        except urllib.error.HTTPError:
            break
        time.sleep(0.5)
    query = urllib.parse.urlencode(
        {
            "url": mar.name,
            "model_name": MODEL,
            "batch_size": config.batch_size,
            "max_batch_delay": config.max_batch_delay_ms,
            "initial_workers": config.workers,
            "response_timeout": config.response_timeout_s,
            "synchronous": "true",
        }
    )
    management(ts, "POST", f"/models?{query}")
    ts.wait_ready(timeout=240)
    return time.perf_counter() - start


def worker_processes(ts: TorchServe) -> list[psutil.Process]:
    if ts.process is None:
        return []
    found = []
    for child in psutil.Process(ts.process.pid).children(recursive=True):
        try:
            if any("model_service_worker" in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


@dataclass
class RunningGateway:
    gateway: Gateway

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"


@contextmanager
def gateway_for(ts: TorchServe) -> Iterator[RunningGateway]:
    """The real gateway on a free port, in a background asyncio thread (as in the tests)."""
    config = GatewayConfig(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        upstream=f"127.0.0.1:{ts.ports.grpc_inference}",
        models=(MODEL,),
        health_interval_s=1.0,
    )
    with gateway_in_thread(config) as gateway:
        yield RunningGateway(gateway)


# -- load -----------------------------------------------------------------------------------


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


def sample_rss(processes: Sequence[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


# -- the run ----------------------------------------------------------------------------------


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


def run(
    seconds: float,
    warmup: float,
    minutes: float,
    out: Path,
    sweep: bool,
    confirm: Sequence[BatchConfig] = (),
) -> bool:
    threads = cpu_quota()
    torch.set_num_threads(threads)
    base_config = BatchConfig()
    lines_setup: list[str] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        store = Path(tmp) / "model-store"
        store.mkdir()
        began = time.perf_counter()
        base, model_title = build_base_archive(store, base_config)
        lines_setup.append(f"archive {time.perf_counter() - began:.0f} s")
        model_dir = Path(tmp) / "model-dir"
        with zipfile.ZipFile(base) as archive:
            archive.extractall(model_dir)
        size = json.loads((model_dir / "model.json").read_text())["input_size"][-1]
        requests = make_requests(32, int(size))

        ports = TorchServePorts.free()
        config_path = write_config(Path(tmp) / "ts-run" / "config.properties", store, ports)
        with config_path.open("a") as config_file:
            # The sweep registers configurations in turn through the management API, which
            # TorchServe >= 0.11 only allows when enabled (on loopback, for this run only).
            config_file.write("enable_model_api=true\n")
        ts = TorchServe(store, {MODEL: base.name}, Path(tmp) / "ts-run", ports, config_path)
        began = time.perf_counter()
        ts.start()
        try:
            ts.wait_ready(timeout=300)
            lines_setup.append(f"TorchServe start {time.perf_counter() - began:.0f} s")

            # In process first, while TorchServe's worker sits idle.
            print("in process", flush=True)
            explainer = Explainer(load_bundle(model_dir))
            inproc = {
                b: show(f"batch {b}", inprocess_load(explainer, requests, b, seconds))
                for b in (1, 8, 16)
            }
            del explainer

            sweeps: list[Sweep] = []
            confirmations: list[list[Sweep]] = []
            with gateway_for(ts) as gw:
                print("end to end, default configuration", flush=True)
                probe = cpu_probe(ts)
                loads = {
                    c: show(
                        f"{c} clients",
                        grpc_load(gw.address, requests, c, seconds, warmup, probe),
                    )
                    for c in (1, 8, 16)
                }
                sweeps.append(Sweep(base_config, 0.0, loads))

                # Sustained run on the default configuration: worker memory over time.
                print(f"sustained run, {minutes:g} min", flush=True)
                memory = sustained(ts, gw.address, requests, minutes)

                for config in SWEEP if sweep else ():
                    print(f"configuration {config_name(config)}", flush=True)
                    took = deploy(ts, variant(base, config), config)
                    levels = (1, 8, 16) if config.batch_size == 1 else (8, 16)
                    loads = {
                        c: show(f"{c} clients", grpc_load(gw.address, requests, c, seconds, warmup))
                        for c in levels
                    }
                    sweeps.append(Sweep(config, took, loads))

                for candidate in confirm:
                    confirmations.append(
                        ab_rounds(ts, gw.address, base, requests, candidate, seconds, warmup)
                    )
        finally:
            ts.stop()
    return write(
        out,
        model_title,
        lines_setup,
        inproc,
        sweeps,
        memory,
        minutes,
        (load_before, os.getloadavg()[0]),
        confirmations,
    )


def ab_rounds(
    ts: TorchServe,
    address: str,
    base: Path,
    requests: Sequence[pb.ExplainRequest],
    candidate: BatchConfig,
    seconds: float,
    warmup: float,
    rounds: int = 2,
) -> list[Sweep]:
    """The default configuration and ``candidate``, deployed in turn ``rounds`` times each.

    Configurations measured one after another on a shared machine differ by the load of
    the moment as much as by themselves; alternating them puts both under the same load.
    """
    measured = []
    for _ in range(rounds):
        for config in (BatchConfig(), candidate):
            print(f"A/B {config_name(config)}", flush=True)
            took = deploy(ts, variant(base, config), config)
            loads = {
                c: show(f"{c} clients", grpc_load(address, requests, c, seconds, warmup))
                for c in (8, 16)
            }
            measured.append(Sweep(config, took, loads))
    return measured


def parse_config(text: str) -> BatchConfig:
    """``b8-d5-w2-t1`` -> ``BatchConfig(8, 5, workers=2, threads=1)``; ``-tN`` is optional."""
    parts = dict((p[0], int(p[1:])) for p in text.split("-"))
    return BatchConfig(
        batch_size=parts["b"],
        max_batch_delay_ms=parts["d"],
        workers=parts["w"],
        threads=parts.get("t", 0),
    )


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
    ts: TorchServe, address: str, requests: Sequence[pb.ExplainRequest], minutes: float
) -> Memory:
    """8 clients for ``minutes``; worker RSS sampled every few seconds while they run."""
    workers = worker_processes(ts)
    memory = Memory([], [], 0)
    done = threading.Event()
    result: list[Load] = []
    seconds = minutes * 60.0

    def drive() -> None:
        try:
            result.append(grpc_load(address, requests, 8, seconds, 0.0))
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


# -- report ---------------------------------------------------------------------------------


def write(
    out: Path,
    model_title: str,
    setup: list[str],
    inproc: dict[int, Load],
    sweeps: list[Sweep],
    memory: Memory,
    minutes: float,
    load: tuple[float, float],
    confirmations: Sequence[list[Sweep]] = (),
) -> bool:
    base = sweeps[0]
    ok = True
    e2e_8 = base.loads[8].throughput
    # Against the engine's best in-process figure (its largest batch usually), not only
    # batch 8: the served batch size is a TorchServe setting, the engine's ceiling is not.
    best_inproc = max(inproc, key=lambda n: inproc[n].throughput)
    ratio = e2e_8 / inproc[best_inproc].throughput
    overhead_ms = (base.loads[1].percentile(50) - inproc[1].percentile(50)) * 1e3
    reference = dataclasses.replace(base.config, batch_size=1)
    batch1 = next((s for s in sweeps if s.config == reference), None)
    batching = base.loads[16].throughput / batch1.loads[16].throughput if batch1 else float("nan")
    # Batching's gain with one worker, where batch 1 cannot hide its serial phases behind
    # a second worker (the default before the workers split the cores).
    one = {s.config.batch_size: s for s in sweeps if s.config.workers == 1}
    batching_w1 = (
        one[8].loads[16].throughput / one[1].loads[16].throughput
        if 8 in one and 1 in one
        else float("nan")
    )
    overhead_b1_ms = float("nan")
    if batch1 is not None and 1 in batch1.loads:
        overhead_b1_ms = (batch1.loads[1].percentile(50) - inproc[1].percentile(50)) * 1e3
    lines = [
        "# End to end: gRPC gateway and TorchServe against the engine in process",
        "",
        f"Generated by `python -m bench.e2e` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"- model: {model_title}; requests: Explain, `{METHOD}`, top_k 1, threshold mask, "
        "PNG 8-bit map; 32 held-out synthetic PNG images in rotation",
        f"- CPU: {cpu_model()}; {os.cpu_count()} cores visible, {cpu_quota()} usable; "
        "clients, gateway, TorchServe frontend and worker share them; OpenMP wait policy "
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset (active)')} (the workers inherit it); "
        "no GPU here",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"grpcio {grpc.__version__}",
        f"- setup: {', '.join(setup)}; load average {load[0]:.2f} before, {load[1]:.2f} after "
        "(a shared machine)",
        "- in process = `Explainer.explain_batch` over `load_bundle` of the same archive's "
        "files, one batch after another; e2e = N client threads (a channel each) calling "
        "`Explain` back to back on the gateway; only calls inside the measured window count",
        "",
        "| path | clients / batch | requests/s | p50 ms | p90 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for batch, result in inproc.items():
        lines.append(
            f"| in process | batch {batch} | {result.throughput:.1f} | "
            f"{result.percentile(50) * 1e3:.1f} | {result.percentile(90) * 1e3:.1f} | "
            f"{result.errors} |"
        )
    for clients, result in base.loads.items():
        lines.append(
            f"| gRPC, TorchServe {config_name(base.config)} | {clients} clients | "
            f"{result.throughput:.1f} | {result.percentile(50) * 1e3:.1f} | "
            f"{result.percentile(90) * 1e3:.1f} | {result.errors} |"
        )
    met_tp = ratio >= THROUGHPUT_BAR
    met_b = batching >= BATCHING_BAR
    ok &= met_tp and met_b
    lines += [
        "",
        "| bar | measured | bar | met |",
        "|---|---:|---|---|",
        f"| e2e throughput at 8 clients / in process at its best (batch {best_inproc}) | "
        f"{ratio:.2f} | >= "
        f"{THROUGHPUT_BAR} | {'yes' if met_tp else 'NO'} |",
        f"| p50 overhead at 1 client (e2e p50 - in-process batch-1 p50) | {overhead_ms:.1f} ms "
        "| reported | |",
        f"| p50 overhead at 1 client, batch size 1 (no wait for a batch to fill) | "
        f"{overhead_b1_ms:.1f} ms | reported | |",
        f"| dynamic batching: 16 clients, batch {base.config.batch_size} / batch 1 (same "
        f"workers) throughput | {batching:.2f} | >= "
        f"{BATCHING_BAR} | {'yes' if met_b else 'NO'} |",
        f"| dynamic batching, one worker with both cores: 16 clients, batch 8 / batch 1 | "
        f"{batching_w1:.2f} | reported | |",
        f"| worker RSS (sum over the model's {base.config.workers} workers) over "
        f"{minutes:.1f} min of 8 clients ({memory.requests} requests): "
        "growth (last quarter - first quarter, first tenth skipped) and slope | "
        f"{memory.growth_mib:+.1f} MiB, {memory.slope_mib_per_min:+.2f} MiB/min | no growth "
        f"(< {GROWTH_BAR_MIB:g} MiB){'' if minutes >= 10 else '; run --minutes 10 for the bar'} "
        f"| {'yes' if abs(memory.growth_mib) < GROWTH_BAR_MIB else 'NO'} |",
        "",
        f"Worker resident memory (sum over {base.config.workers} workers) during the "
        f"sustained run: {min(memory.rss_mib):.0f} to "
        f"{max(memory.rss_mib):.0f} MiB (samples: "
        + " ".join(f"{v:.0f}" for v in memory.rss_mib)
        + ").",
        "",
        "CPU per request inside the measured window (ms of CPU time; the 2 cores give 2000 "
        "ms per second): where the end-to-end path spends what the engine does not.",
        "",
        "| path | clients / batch | " + " | ".join(COMPONENTS) + " | total |",
        "|---|---:|" + "---:|" * (len(COMPONENTS) + 1),
    ]
    for batch, result in inproc.items():
        per = result.cpu_seconds.get("in process", float("nan")) / max(1, result.completed)
        cells = " | ".join(f"{per * 1e3:.1f}" if c == "worker" else "" for c in COMPONENTS)
        lines.append(f"| in process | batch {batch} | {cells} | {per * 1e3:.1f} |")
    for clients, result in base.loads.items():
        n = max(1, result.completed)
        values = [result.cpu_seconds.get(c, float("nan")) / n * 1e3 for c in COMPONENTS]
        lines.append(
            f"| gRPC {config_name(base.config)} | {clients} clients | "
            + " | ".join(f"{v:.1f}" for v in values)
            + f" | {sum(values):.1f} |"
        )
    lines += [
        "",
        "TorchServe configurations (same TorchServe, each registered in turn):",
        "",
        "| batch size | max delay ms | workers | req/s, 8 clients | req/s, 16 clients | "
        "p50 ms, 16 clients | p90 ms, 16 clients |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in sorted(
        sweeps,
        key=lambda s: (s.config.workers, s.config.batch_size, s.config.max_batch_delay_ms),
    ):
        c, loads = entry.config, entry.loads
        lines.append(
            f"| {c.batch_size} | {c.max_batch_delay_ms} | {c.workers} | "
            f"{loads[8].throughput:.1f} | {loads[16].throughput:.1f} | "
            f"{loads[16].percentile(50) * 1e3:.1f} | {loads[16].percentile(90) * 1e3:.1f} |"
        )
    if len(sweeps) > 1:
        for clients in (8, 16):
            best = max(sweeps, key=lambda s: s.loads[clients].throughput)
            lines.append(
                f"\nBest at {clients} clients in this run: {config_name(best.config)}, "
                f"{best.loads[clients].throughput:.1f} req/s ({config_name(base.config)}: "
                f"{base.loads[clients].throughput:.1f})."
            )
    for rounds in confirmations:
        lines += [
            "",
            f"A/B, alternating on the same TorchServe ({len(rounds) // 2} rounds each):",
            "",
            "| configuration | req/s, 8 clients | req/s, 16 clients | p50 ms, 16 clients |",
            "|---|---|---|---|",
        ]
        for name in dict.fromkeys(config_name(r.config) for r in rounds):
            mine = [r for r in rounds if config_name(r.config) == name]
            rates = [" ".join(f"{r.loads[c].throughput:.1f}" for r in mine) for c in (8, 16)]
            p50 = " ".join(f"{r.loads[16].percentile(50) * 1e3:.0f}" for r in mine)
            lines.append(f"| {name} | {rates[0]} | {rates[1]} | {p50} |")
    lines.append("")
    write_report(out, lines)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per load")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured lead-in per load")
    parser.add_argument("--minutes", type=float, default=1.0, help="sustained run (memory)")
    parser.add_argument("--no-sweep", action="store_true", help="default configuration only")
    parser.add_argument(
        "--confirm",
        action="append",
        default=[],
        metavar="bB-dD-wW",
        help="A/B a configuration against the default, alternating (e.g. b8-d5-w2)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a bar is missed")
    add_omp_policy_argument(parser)
    args = parser.parse_args(argv)
    if (code := rerun_with_omp_policy(MODULE, args.omp_wait_policy, argv)) is not None:
        return code
    confirm = [parse_config(text) for text in args.confirm]
    ok = run(args.seconds, args.warmup, args.minutes, args.out, not args.no_sweep, confirm)
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    # Exit only on failure: bench.run runs suites in one process via runpy.
    if code := main():
        sys.exit(code)
