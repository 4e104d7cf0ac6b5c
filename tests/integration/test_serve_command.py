"""`saliency-serve serve` (what `make serve` runs): both servers up, then a clean Ctrl-C."""

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from service.client import SaliencyClient

pytestmark = pytest.mark.integration


def _lines(process: subprocess.Popen[str]) -> "queue.Queue[str]":
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(
    lines: "queue.Queue[str]", pattern: str, timeout: float, process: subprocess.Popen[str]
) -> re.Match[str]:
    end = time.monotonic() + timeout
    seen = []
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None and lines.empty():
                break
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r}; output: {''.join(seen)}")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_serve_runs_torchserve_and_gateway_and_stops_both_on_ctrl_c(
    model_store: Path,
    tmp_path: Path,
    samples,  # type: ignore[no-untyped-def]
) -> None:
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--model-store",
        str(model_store),
        "--run-dir",
        str(tmp_path / "run"),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--free-torchserve-ports",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = _lines(process)
        ts_port = int(
            _wait_for(lines, r"TorchServe: gRPC 127\.0\.0\.1:(\d+)", 240, process).group(1)
        )
        port = int(_wait_for(lines, r"gateway: gRPC [\d.]+:(\d+)", 60, process).group(1))
        page = _wait_for(lines, r"web page and HTTP/JSON: (http://[\d.]+:(\d+)/)", 5, process)
        with SaliencyClient(f"127.0.0.1:{port}") as client:
            assert client.predict(samples[0][0]).predictions[0].index == samples[0][1]
        with urllib.request.urlopen(page.group(1) + "v1/models", timeout=10) as listed:
            assert json.load(listed)["models"] == ["shapes"]
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        _wait_for(lines, "stopping TorchServe", 5, process)
        assert not _listening(port)
        assert not _listening(int(page.group(2)))
        assert not _listening(ts_port)
    finally:
        if process.poll() is None:
            process.kill()
