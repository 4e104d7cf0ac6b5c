"""The processes the chaos runs start and hurt: a gateway of its own (so that its memory is
its own), ``saliency-serve serve``, and the pieces of TorchServe to kill."""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.launcher import TorchServe

API = "saliency.v1.ExplainService"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Console:
    """A child's output, line by line, read by a thread so that it never blocks."""

    process: subprocess.Popen[str]
    lines: queue.Queue[tuple[float, str]] = field(default_factory=queue.Queue)
    seen: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.put((time.monotonic(), line.rstrip()))

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, pattern: str, timeout: float) -> tuple[float, re.Match[str]]:
        """When the first line matching ``pattern`` came, and the match."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                when, line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.seen.append((when, line))
            match = re.search(pattern, line)
            if match:
                return when, match
        tail = "\n".join(line for _, line in self.seen[-20:])
        raise TimeoutError(f"no line matching {pattern!r}; last lines:\n{tail}")


def start(command: list[str]) -> tuple[subprocess.Popen[str], Console]:
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return process, Console(process)


@contextlib.contextmanager
def gateway_process(torchserve: TorchServe, *flags: str) -> Iterator[tuple[psutil.Process, str]]:
    """``saliency-serve gateway`` in front of ``torchserve``: (its process, its address)."""
    port = free_port()
    process, console = start(
        [
            "gateway",
            "--upstream",
            torchserve.grpc_address,
            "--upstream-key-file",
            str(torchserve.key_file),
            "--model",
            next(iter(torchserve.models)),
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            *flags,
        ]
    )
    try:
        console.wait_for(r"^gateway: gRPC", 120)
        yield psutil.Process(process.pid), f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(60)


def serve_process(
    model_store: Path, run_dir: Path, policy: str, health_port: int
) -> tuple[subprocess.Popen[str], Console, str]:
    """``saliency-serve serve`` on free ports, started and listening: process, output, address."""
    process, console = start(
        [
            "serve",
            "--model-store",
            str(model_store),
            "--run-dir",
            str(run_dir),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--health-port",
            str(health_port),
            "--free-torchserve-ports",
            "--predict-workers",
            "1",
            "--on-backend-exit",
            policy,
        ]
    )
    _, match = console.wait_for(r"gateway: gRPC [\d.]+:(\d+)", 400)
    return process, console, f"127.0.0.1:{match.group(1)}"


def java_of(pid: int) -> psutil.Process:
    (java,) = [c for c in psutil.Process(pid).children(recursive=True) if c.name() == "java"]
    return java


def worker_pids(torchserve: TorchServe, model: str) -> list[int]:
    """The pids of the model's workers that run: TorchServe lists a worker whose process
    died (and that it failed to restart) as it was, READY."""
    described = torchserve.management("GET", f"/models/{model}")[0]
    return sorted(w["pid"] for w in described["workers"] if _running(w["pid"]))


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listed_workers(torchserve: TorchServe) -> dict[str, list[int]]:
    """Every model's listed worker pids, running or not (a restart changes them)."""
    return {
        name: sorted(
            w["pid"] for w in torchserve.management("GET", f"/models/{name}")[0]["workers"]
        )
        for name in torchserve.registered
    }


def serving(address: str, service: str = API) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


class PeakMemory:
    """The largest RSS of a process while the ``with`` block runs (sampled every 50 ms)."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.mb = max(self.mb, rss_mb(self.process))
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
