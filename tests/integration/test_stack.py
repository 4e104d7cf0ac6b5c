"""``service.stack``: what it starts is gone when its block ends, also when the block raises.

The session's stack (``conftest.py``) is itself started by ``running_stack``; these tests
start more beside it, on their own free ports.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.launcher import TorchServe
from service.stack import gateway_options, running_gateway, running_torchserve

pytestmark = pytest.mark.integration


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def processes_naming(path: Path) -> list[str]:
    """Live processes whose command line mentions ``path`` (TorchServe's run directory)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(str(path) in c for c in cmdline):
            found.append(" ".join(cmdline)[:200])
    return found


def test_torchserve_is_gone_after_its_block_also_when_the_block_raises(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # No model: TorchServe is ready once its frontend answers, in a few seconds.
    with (
        pytest.raises(RuntimeError, match="the block failed"),
        running_torchserve(tmp_path, {}, run_dir, ready_timeout=120) as server,
    ):
        ports = server.ports
        assert server.management("GET", "/models") == {"models": []}
        assert processes_naming(run_dir)  # the launcher and its Java frontend
        raise RuntimeError("the block failed")
    assert processes_naming(run_dir) == []
    assert not any(listening(port) for port in (ports.inference, ports.management))
    assert (run_dir / "tmp").is_dir()  # its private temp dir, where its pid file went


def test_gateway_is_gone_after_its_block(torchserve: TorchServe) -> None:
    loops_before = sum(t.name == "gateway-loop" for t in threading.enumerate())
    options = gateway_options(torchserve)
    with running_gateway(torchserve.grpc_address, list(torchserve.models), **options) as started:
        with grpc.insecure_channel(started.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(started.metrics_url, timeout=5) as page:
            assert b"saliency_" in page.read()
        port, metrics_port = started.gateway.port, started.gateway.metrics_port
    assert not listening(port)
    assert not listening(metrics_port)
    assert sum(t.name == "gateway-loop" for t in threading.enumerate()) == loops_before
