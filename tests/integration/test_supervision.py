"""Finding 13: when TorchServe's Java process dies, ``serve`` neither exited nor restarted it.

Now health turns NOT_SERVING, then ``--on-backend-exit restart`` brings TorchServe back
and ``exit`` stops with status 1; SIGTERM lets the calls in flight finish.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import SaliencyClient
from tests.integration.test_serve_command import _lines, _wait_for
from tests.integration.test_stack import processes_naming

pytestmark = pytest.mark.integration
Samples = list[tuple[bytes, int, object]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve(
    model_store: Path, run_dir: Path, policy: str, health_port: int
) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--model-store",
        str(model_store),
        "--run-dir",
        str(run_dir),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--health-port",
        str(health_port),
        "--free-torchserve-ports",
        "--predict-workers",
        "1",
        "--on-backend-exit",
        policy,
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def java_of(process: subprocess.Popen[str]) -> psutil.Process:
    found = [
        child
        for child in psutil.Process(process.pid).children(recursive=True)
        if child.name() == "java"
    ]
    assert len(found) == 1, found
    return found[0]


def status(health_port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        request = health_pb2.HealthCheckRequest(service="saliency.v1.ExplainService")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def until(check: object, timeout: float) -> float:
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < timeout, "the state was not reached"
        time.sleep(0.05)
    return time.monotonic() - start


def test_serve_restarts_a_dead_torchserve_and_drains_on_sigterm(
    model_store: Path, tmp_path: Path, samples: Samples
) -> None:
    health_port = free_port()
    process = start_serve(model_store, tmp_path / "run", "restart", health_port)
    try:
        lines = _lines(process)
        port = int(_wait_for(lines, r"gateway: gRPC [\d.]+:(\d+)", 300, process).group(1))
        data, label, _ = samples[0]
        with SaliencyClient(f"127.0.0.1:{port}") as client:
            assert client.predict(data).predictions[0].index == label
            java_of(process).kill()
            until(lambda: status(health_port) == health_pb2.HealthCheckResponse.NOT_SERVING, 30)
            _wait_for(lines, r"restarting it in 1 s", 30, process)
            _wait_for(lines, r"TorchServe is back", 300, process)
            until(lambda: status(health_port) == health_pb2.HealthCheckResponse.SERVING, 60)
            assert client.predict(data, timeout=30).predictions[0].index == label

            # SIGTERM with a call in flight: the call finishes, then serve exits 0.
            answers: list[object] = []
            slow = threading.Thread(
                target=lambda: answers.append(
                    client.explain(data, methods=["sobol"], top_k=1, timeout=120)
                )
            )
            slow.start()
            time.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            slow.join(150)
            assert len(answers) == 1 and answers[0].explanations  # type: ignore[attr-defined]
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_exits_1_when_torchserve_dies_under_the_exit_policy(
    model_store: Path, tmp_path: Path
) -> None:
    process = start_serve(model_store, tmp_path / "run", "exit", free_port())
    try:
        lines = _lines(process)
        _wait_for(lines, r"gateway: gRPC [\d.]+:(\d+)", 300, process)
        java_of(process).kill()
        assert process.wait(120) == 1
        _wait_for(lines, r"TorchServe exited .*stopping", 5, process)
        assert processes_naming(tmp_path / "run") == []  # its workers did not outlive it
    finally:
        if process.poll() is None:
            process.kill()
