"""Real TorchServe (Java + Python worker) and the real gateway, started once per session.

Both come up through ``service.stack`` (as the benchmarks do), on free loopback ports so a
running `make serve` does not get in the way.
"""

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.archive import BatchConfig, build_default_archive
from service.client import SaliencyClient
from service.launcher import TorchServe
from service.models.synthetic import generate
from service.stack import RunningGateway, Stack, running_stack, running_torchserve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model-store")
    # Batch size 4 with a short delay so that concurrent tests really share batches.
    build_default_archive(store, batch=BatchConfig(batch_size=4, max_batch_delay_ms=20))
    return store


@pytest.fixture(scope="session")
def stack(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("ts-run")  # kept after the session: its logs
    # Reflection is off by default (test_security); test_serving lists the services with it.
    with running_stack(model_store, {"shapes": "shapes.mar"}, run_dir, reflection=True) as started:
        yield started


@pytest.fixture(scope="session")
def scratch_stack(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second whole stack for the tests that hurt it (kill or freeze workers, fuzz): what
    they break fails them, not the tests that run after them on the session's stack."""
    run_dir = tmp_path_factory.mktemp("ts-scratch")
    with running_stack(model_store, {"shapes": "shapes.mar"}, run_dir) as started:
        yield started


@pytest.fixture(scope="session")
def small_torchserve(
    model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TorchServe]:
    """A second TorchServe beside the session's: one worker, batch 1, a queue of 2 requests
    and no forward-only pool (instances that must not disturb each other; a full queue)."""
    from bench.e2e.servers import variant

    config = BatchConfig(workers=1, batch_size=1, max_batch_delay_ms=0)
    mar = variant(model_store / "shapes.mar", config)
    run_dir = tmp_path_factory.mktemp("ts-small")
    with running_torchserve(
        model_store,
        {"shapes": mar.name},
        run_dir,
        settings={"job_queue_size": 2},
        split_pools=False,
    ) as started:
        yield started


@pytest.fixture(scope="session")
def torchserve(stack: Stack) -> TorchServe:
    return stack.torchserve


@pytest.fixture(scope="session")
def gateway(stack: Stack) -> RunningGateway:
    return stack.gateway


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
