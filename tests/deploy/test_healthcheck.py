"""deploy/docker/healthcheck.py: the image's HEALTHCHECK and TorchServe's exec probes."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.support import DOCKER

SCRIPT = DOCKER / "healthcheck.py"


@pytest.fixture(scope="module")
def hc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Ping(BaseHTTPRequestHandler):
    status = 200
    key = ""  # like TorchServe with token authorization on: /ping needs the inference key

    def do_GET(self) -> None:
        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            self.send_response(401)
            self.end_headers()
            return
        body = b'{"status": "Healthy"}' if self.status == 200 else b'{"status": "Unhealthy"}'
        self.send_response(self.status if self.path == "/ping" else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ping_server() -> Iterator[tuple[str, type[_Ping]]]:
    handler = type("Handler", (_Ping,), {"status": 200, "key": ""})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ping", handler
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchserve_healthy_and_unhealthy(hc: ModuleType, ping_server) -> None:
    url, handler = ping_server
    ok, detail = hc.check_torchserve(url)
    assert ok and "Healthy" in detail
    handler.status = 500
    ok, detail = hc.check_torchserve(url)
    assert not ok and "500" in detail


def test_torchserve_with_token_authorization(hc: ModuleType, ping_server, tmp_path: Path) -> None:
    url, handler = ping_server
    handler.key = "inference-key-1"
    key_file = tmp_path / "key_file.json"
    assert hc.check_torchserve(url) == (False, "HTTP 401")  # no key sent
    ok, detail = hc.check_torchserve(url, key_file=str(key_file))
    assert not ok and "no inference key" in detail  # TorchServe has not written it yet
    keys = {"management": {"key": "m"}, "inference": {"key": "inference-key-1"}, "API": {}}
    key_file.write_text(json.dumps(keys))
    ok, detail = hc.check_torchserve(url, key_file=str(key_file))
    assert ok and "Healthy" in detail


def test_torchserve_down(hc: ModuleType) -> None:
    ok, detail = hc.check_torchserve(f"http://127.0.0.1:{_free_port()}/ping", timeout=1)
    assert not ok and "unreachable" in detail


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_gateway_serving_and_not(hc: ModuleType, health_server) -> None:
    target, servicer = health_server
    status = health_pb2.HealthCheckResponse
    servicer.set("", status.SERVING)
    servicer.set("saliency.v1.ExplainService", status.NOT_SERVING)
    assert hc.check_gateway(target, "") == (True, "SERVING")
    assert hc.check_gateway(target, "saliency.v1.ExplainService") == (False, "NOT_SERVING")
    ok, detail = hc.check_gateway(target, "no.such.Service")
    assert not ok and "NOT_FOUND" in detail


def test_gateway_down(hc: ModuleType) -> None:
    ok, detail = hc.check_gateway(f"127.0.0.1:{_free_port()}", "", timeout=1)
    assert not ok
    assert "UNAVAILABLE" in detail or "DEADLINE_EXCEEDED" in detail


def test_cli_exit_codes(ping_server) -> None:
    url, handler = ping_server

    def rc(*args: str) -> int:
        cmd = [sys.executable, str(SCRIPT), *args]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    assert rc("torchserve", url) == 0
    handler.status = 503
    assert rc("torchserve", url) == 1
    assert rc("bogus") == 2


def test_torchserve_check_imports_no_grpc() -> None:
    """The exec probe runs every few seconds: it must stay a stdlib-only, fast check."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('hc', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.main(['torchserve', 'http://127.0.0.1:9/ping'])\n"
        "assert 'grpc' not in sys.modules, 'the torchserve check imported grpc'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
