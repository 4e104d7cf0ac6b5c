"""Real TorchServe (Java + Python worker) and the real gateway, started once per session.

Both listen on free loopback ports so a running `make serve` does not get in the way.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from service.archive import BatchConfig, build_default_archive
from service.client import SaliencyClient
from service.gateway.server import Gateway, GatewayConfig, gateway_in_thread
from service.launcher import TorchServe, TorchServePorts
from service.models.synthetic import generate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model-store")
    # Batch size 4 with a short delay so that concurrent tests really share batches.
    build_default_archive(store, batch=BatchConfig(batch_size=4, max_batch_delay_ms=20))
    return store


@pytest.fixture(scope="session")
def torchserve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    server = TorchServe(
        model_store,
        {"shapes": "shapes.mar"},
        tmp_path_factory.mktemp("ts-run"),
        TorchServePorts.free(),
    )
    server.start()
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()


@dataclass
class RunningGateway:
    gateway: Gateway

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics_port}/metrics"


@pytest.fixture(scope="session")
def gateway(torchserve: TorchServe) -> Iterator[RunningGateway]:
    config = GatewayConfig(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        upstream=f"127.0.0.1:{torchserve.ports.grpc_inference}",
        models=("shapes",),
        health_interval_s=0.5,
    )
    with gateway_in_thread(config) as started:
        yield RunningGateway(started)


@pytest.fixture(scope="session")
def client(gateway: RunningGateway) -> Iterator[SaliencyClient]:
    with SaliencyClient(gateway.address) as c:
        yield c


@pytest.fixture(scope="session")
def channel(gateway: RunningGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def samples() -> list[tuple[bytes, int, object]]:
    """Held-out synthetic images as PNG bytes, with their label and ground-truth mask."""
    import cv2

    batch = generate(8, seed=424242)
    out = []
    for image, label, mask in zip(batch.images, batch.labels, batch.masks, strict=True):
        ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok
        out.append((data.tobytes(), int(label), mask))
    return out
