"""The archive under test and the TorchServe it runs on: configurations, registration, workers."""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import psutil
import torch

from bench.e2e import MODEL
from service.archive import BatchConfig
from service.launcher import TorchServe

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


def parse_config(text: str) -> BatchConfig:
    """``b8-d5-w2-t1`` -> ``BatchConfig(8, 5, workers=2, threads=1)``; ``-tN`` is optional."""
    parts = dict((p[0], int(p[1:])) for p in text.split("-"))
    return BatchConfig(
        batch_size=parts["b"],
        max_batch_delay_ms=parts["d"],
        workers=parts["w"],
        threads=parts.get("t", 0),
    )


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
    try:
        parsed = ts.management(method, path, timeout=timeout)
    except ValueError:
        return {}
    if parsed is None:
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
