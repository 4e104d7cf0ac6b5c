"""``saliency-serve archive``: a model becomes a TorchServe ``.mar`` (pt2 + onnx + model.json).

A user's model and the default one take the same path: wrap in pixel space, export both
forwards, refuse on a logits parity failure, write ``model.json``, pack with the handler.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import handlers
from service.engine.modules import freeze
from service.runtime.artifacts import META_FILE, ModelMeta, build_eager_net
from service.runtime.wrap import Normalized

HANDLER = Path(handlers.__file__).parent / "saliency_handler.py"
DEFAULT_NAME = "shapes"


@dataclass(frozen=True)
class BatchConfig:
    """TorchServe's per-model batching, chosen by measurement (see bench/)."""

    # Two workers of one thread each on the 2-core reference machine: one worker's serial
    # phases (PNG decoding and encoding, Python, the socket to the frontend) overlap the
    # other's convolutions. With 8 clients: 270-279 requests/s against 218-220 for one
    # worker with both cores at batch 8 (bench/results/e2e.md, alternated A/B).
    batch_size: int = 4
    max_batch_delay_ms: int = 10
    workers: int = 2
    response_timeout_s: int = 120
    threads: int = 0  # torch and ONNX Runtime threads per worker; 0: CPU quota / workers
    precision: str = "float32"  # the torch methods' (Engine); bfloat16 / float16: autocast

    def yaml(self) -> str:
        return (
            f"minWorkers: {self.workers}\nmaxWorkers: {self.workers}\n"
            f"batchSize: {self.batch_size}\nmaxBatchDelay: {self.max_batch_delay_ms}\n"
            f"responseTimeout: {self.response_timeout_s}\n"
            f"handler:\n  threads: {self.threads}\n  precision: {self.precision}\n"
        )


def build_archive(
    *,
    name: str,
    eager: dict[str, Any] | None,
    exported: Path | None,
    labels: Sequence[str],
    input_size: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    target_layer: str | None,
    out_dir: Path,
    files: Sequence[Path] = (),
    batch: BatchConfig | None = None,
    atol: float = 1e-4,
) -> Path:
    """Write ``out_dir/<name>.mar``; returns its path.

    Args:
        name: model name clients use.
        eager: ``{"module", "class", "kwargs", "weights"}`` of the un-normalised network
            (``module`` is an importable name or a ``.py`` file among ``files``), or None.
        exported: a ``torch.export`` program of the un-normalised network (no CAM methods).
        labels: class names, index order.
        input_size: ``(C, H, W)``.
        mean, std: the normalisation the network expects, in ``[0, 1]`` pixel units.
        target_layer: CAM layer name inside the pixel-space wrapper (``model.<name>``).
        out_dir: where the ``.mar`` goes.
        files: files the eager spec refers to (model file, weights).
        batch: TorchServe batching and workers.
        atol: logits parity bound between torch, ``.pt2`` and ``.onnx``.

    Raises:
        ParityError: the exported forwards disagree by more than ``atol``.
    """
    from service.runtime.export import export_artifacts  # heavy (onnx exporter): lazily

    if (eager is None) == (exported is None):
        raise ValueError("give exactly one of an eager module spec or an exported program")
    if len(mean) != input_size[0] or len(std) != input_size[0]:
        raise ValueError(f"mean and std need {input_size[0]} values each")
    if eager is not None:
        with tempfile.TemporaryDirectory() as tmp:
            for file in files:
                shutil.copy(file, tmp)
            net = build_eager_net(eager, Path(tmp))
    else:
        assert exported is not None
        net = torch.export.load(exported).module()
        target_layer = None
    module = freeze(Normalized(net, mean, std))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        export_artifacts(module, input_size, staging, atol=atol)
        version = _version(staging / "model.onnx", labels)
        meta = ModelMeta(
            name=name,
            version=version,
            labels=tuple(labels),
            input_size=input_size,
            mean=tuple(mean),
            std=tuple(std),
            target_layer=target_layer,
            eager=eager,
        )
        (staging / META_FILE).write_text(json.dumps(meta.to_json(), indent=2))
        for file in files:
            shutil.copy(file, staging / file.name)
        (staging / "model-config.yaml").write_text((batch or BatchConfig()).yaml())
        extra = [p for p in sorted(staging.iterdir()) if p.name != "model-config.yaml"]
        _pack(name, version, staging, extra, out_dir)
    return out_dir / f"{name}.mar"


def _pack(name: str, version: str, staging: Path, extra: list[Path], out_dir: Path) -> None:
    command = [
        str(Path(sys.executable).parent / "torch-model-archiver"),
        "--model-name",
        name,
        "--version",
        version,
        "--handler",
        str(HANDLER),
        "--extra-files",
        ",".join(str(p) for p in extra),
        "--config-file",
        str(staging / "model-config.yaml"),
        "--export-path",
        str(out_dir),
        "--force",
    ]
    # The archiver stages files in $TMPDIR/<model name> and deletes that folder afterwards:
    # give it a private TMPDIR so it can never touch another build's (or anyone's) files.
    with tempfile.TemporaryDirectory() as private_tmp:
        env = {**os.environ, "TMPDIR": private_tmp}
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {result.stderr.strip()}")


def _version(onnx_path: Path, labels: Sequence[str]) -> str:
    digest = hashlib.sha256(onnx_path.read_bytes())
    digest.update("\n".join(labels).encode())
    return digest.hexdigest()[:12]


def build_default_archive(out_dir: Path, *, batch: BatchConfig | None = None) -> Path:
    """The default model (trained once, cached) through the same path as a user's."""
    from service.models.default import ensure_default_model

    model_dir = ensure_default_model()
    trained = json.loads((model_dir / "meta.json").read_text())
    eager = {
        "module": "service.models.net",
        "class": "SaliencyNet",
        "kwargs": {"num_classes": len(trained["labels"])},
        "weights": "weights.pt",
    }
    channels, height, width = trained["input_size"]
    return build_archive(
        name=DEFAULT_NAME,
        eager=eager,
        exported=None,
        labels=trained["labels"],
        input_size=(channels, height, width),
        mean=trained["mean"],
        std=trained["std"],
        target_layer=trained["target_layer"],
        out_dir=out_dir,
        files=[model_dir / "weights.pt"],
        batch=batch,
    )
