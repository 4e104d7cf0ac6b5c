"""`saliency-serve serve --model-store DIR` (what `make serve` runs) in a subprocess: every
archive of the store served, the default model's rule, a model added by dropping its archive
and restarting, the listing from the client and the CLI, and a clean Ctrl-C."""

import io
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.archive import BatchConfig, build_archive
from service.client import SaliencyClient
from service.protocol.names import METHODS

pytestmark = pytest.mark.integration
STORE_MODELS = Path(__file__).parent / "store"


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


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _archived(mar: Path) -> dict[str, object]:
    """What the archive itself says of the model (its model.json): the independent truth
    the listing is checked against."""
    with zipfile.ZipFile(mar) as archive:
        return dict(json.loads(archive.read("model.json")))


@pytest.fixture(scope="module")
def brightness_mar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.integration.store.brightness import LABELS

    out = tmp_path_factory.mktemp("brightness")
    return build_archive(
        name="brightness",
        eager={"module": "brightness.py", "class": "Brightness", "kwargs": {}},
        exported=None,
        labels=LABELS,
        input_size=(3, 32, 32),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        target_layer=None,
        out_dir=out,
        files=[STORE_MODELS / "brightness.py"],
        batch=BatchConfig(workers=1, batch_size=1, max_batch_delay_ms=0),
    )


def _answered(client: SaliencyClient, timeout: float = 120.0) -> list[Any]:
    """ListModels once every model's workers have answered the gateway's health probe
    (its ModelInfo is what the listing reports; a probe may wait behind a busy worker)."""
    end = time.monotonic() + timeout
    while True:
        models = list(client.list_models().models)
        if all(m.version for m in models) or time.monotonic() > end:
            return models
        time.sleep(0.5)


def _command(store: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--model-store",
        str(store),
        "--run-dir",
        str(run_dir),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--free-torchserve-ports",
        "--predict-workers",
        "1",
        *extra,
    ]


@dataclass
class Served:
    port: int
    torchserve_port: int
    http_url: str
    lines: "queue.Queue[str]"
    process: subprocess.Popen[str]
    said: list[str]


@contextmanager
def serving(store: Path, run_dir: Path, models: int) -> Iterator[Served]:
    """``serve`` over ``store`` until its gateway listens; Ctrl-C after, which must stop
    both servers and free their ports."""
    process = subprocess.Popen(
        _command(store, run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = _lines(process)
        ts_port = int(
            _wait_for(lines, r"TorchServe: gRPC 127\.0\.0\.1:(\d+)", 600, process).group(1)
        )
        said = [_wait_for(lines, r"^  .*", 30, process).string for _ in range(models)]
        said.append(_wait_for(lines, r"^default model: .*", 30, process).string)
        port = int(_wait_for(lines, r"gateway: gRPC [\d.]+:(\d+)", 60, process).group(1))
        page = _wait_for(lines, r"web page and HTTP/JSON: (http://[\d.]+:(\d+)/)", 5, process)
        yield Served(port, ts_port, page.group(1), lines, process, said)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        _wait_for(lines, "stopping TorchServe", 5, process)
        assert not _listening(port)
        assert not _listening(int(page.group(2)))
        assert not _listening(ts_port)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_store_is_served_and_a_dropped_archive_after_a_restart(
    model_store: Path,
    brightness_mar: Path,
    tmp_path: Path,
    samples,  # type: ignore[no-untyped-def]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(brightness_mar, store)
    truth = {
        "brightness": _archived(brightness_mar),
        "shapes": _archived(model_store / "shapes.mar"),
    }
    cam_methods = {"grad_cam", "grad_cam_pp", "smooth_grad_cam_pp"}

    # One archive: it is the default, and the built-in model is not built beside it.
    with serving(store, tmp_path / "run1", models=1) as first:
        line, default = first.said
        assert line.startswith(f"  brightness (default): version {truth['brightness']['version']}")
        assert "input 3x32x32, 2 labels, CAM layer none" in line
        assert default.strip() == "default model: brightness (the only model)"
        with SaliencyClient(f"127.0.0.1:{first.port}") as client:
            assert [m.name for m in client.list_models().models] == ["brightness"]
            assert client.predict(_png(250)).predictions[0].label == "bright"
    assert sorted(p.name for p in store.glob("*.mar")) == ["brightness.mar"]

    # Drop the built-in model's archive in and restart: both served, it is the default.
    shutil.copy(model_store / "shapes.mar", store)
    with serving(store, tmp_path / "run2", models=2) as second:
        assert second.said[-1].strip() == "default model: shapes (the built-in model's archive)"
        assert [line.split(":")[0].strip() for line in second.said[:2]] == [
            "brightness",
            "shapes (default)",
        ]
        address = f"127.0.0.1:{second.port}"
        with SaliencyClient(address) as client:
            listed = {m.name: m for m in _answered(client)}
            assert list(listed) == ["brightness", "shapes"]
            for name, entry in listed.items():
                archived = truth[name]
                assert entry.version == archived["version"]
                assert [entry.channels, entry.height, entry.width] == archived["input_size"]
                assert entry.labels_count == len(archived["labels"])  # type: ignore[arg-type]
                assert entry.default == (name == "shapes") and entry.serving
            # The CAM methods need a layer: the brightness model has none, shapes has one.
            assert cam_methods.isdisjoint(METHODS.label(m) for m in listed["brightness"].methods)
            assert cam_methods <= {METHODS.label(m) for m in listed["shapes"].methods}
            assert listed["shapes"].target_layer == truth["shapes"]["target_layer"]

            # Empty picks the default; a name picks its model (known answers for both).
            data, label, _ = samples[0]
            assert client.predict(data).predictions[0].index == label
            assert client.predict(_png(250), model="brightness").predictions[0].label == "bright"
            assert client.predict(_png(5), model="brightness").predictions[0].label == "dark"
            info = client.model_info("brightness")
            assert list(info.labels) == ["dark", "bright"]
            assert client.model_info().model.version == truth["shapes"]["version"]
            explained = client.explain(_png(200), model="brightness", methods=["vanilla_gradient"])
            assert explained.model.name == "brightness"
            assert (explained.explanations[0].map.height, explained.explanations[0].map.width) == (
                32,
                32,
            )
            with pytest.raises(grpc.RpcError) as err:
                client.explain(_png(200), model="brightness", methods=["grad_cam"])
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]

            # Any other name: NOT_FOUND naming the served ones, nothing sent upstream.
            with pytest.raises(grpc.RpcError) as err:
                client.predict(_png(5), model="resnet50")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            assert "'resnet50'" in err.value.details()  # type: ignore[attr-defined]
            assert "serves brightness, shapes" in err.value.details()  # type: ignore[attr-defined]

        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("brightness", "shapes", ""):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING, service

        # HTTP's GET /v1/models is ListModels: the same names, default and versions.
        with urllib.request.urlopen(second.http_url + "v1/models", timeout=10) as reply:
            over_http = json.load(reply)
        assert over_http["models"] == ["brightness", "shapes"]
        assert over_http["default"] == "shapes"
        assert [d["version"] for d in over_http["details"]] == [
            truth["brightness"]["version"],
            truth["shapes"]["version"],
        ]

        listing = subprocess.run(
            [sys.executable, "-m", "service.cli", "models", "--address", address],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
        assert [line.split(":")[0] for line in listing] == ["brightness", "shapes (default)"]
        assert f"version {truth['shapes']['version']}" in listing[1]


def test_serve_refuses_a_default_model_the_store_does_not_hold(
    brightness_mar: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(brightness_mar, store)
    done = subprocess.run(
        _command(store, tmp_path / "run", "--default-model", "shapes"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--default-model 'shapes' is not in the store (it holds: brightness)" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before TorchServe was started
