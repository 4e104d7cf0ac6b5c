"""``saliency-serve archive``: a model becomes a TorchServe ``.mar`` (pt2 + onnx + model.json).

A user's model and the default one take the same path: stage its code, wrap it in pixel
space, choose its CAM layer and read its attention (:mod:`service.archive_layers`), export
both forwards, refuse on a logits parity failure, write ``model.json``, pack with the
handler, the model's own files and its requirements.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import handlers
from service.archive_code import (
    ArchiveError,
    checked_requirements,
    load_net,
    restored_path,
    stage,
)
from service.archive_layers import Layers, choose_layers
from service.engine.errors import InvalidInputError, UnsupportedMethodError
from service.engine.modules import freeze
from service.runtime.artifacts import META_FILE, ModelMeta
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

    def yaml(self, *, own_venv: bool = False) -> str:
        """``model-config.yaml``; ``own_venv``: TorchServe gives the model a venv of its own
        (inheriting the server's packages) and installs its requirements there."""
        return (
            f"minWorkers: {self.workers}\nmaxWorkers: {self.workers}\n"
            f"batchSize: {self.batch_size}\nmaxBatchDelay: {self.max_batch_delay_ms}\n"
            f"responseTimeout: {self.response_timeout_s}\n"
            + ("useVenv: true\n" if own_venv else "")
            + f"handler:\n  threads: {self.threads}\n  precision: {self.precision}\n"
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
    requirements: Path | None = None,
    batch: BatchConfig | None = None,
    atol: float = 1e-4,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Write ``out_dir/<name>.mar``; returns its path.

    Args:
        name: model name clients use.
        eager: ``{"module", "class", "kwargs", "weights"}`` of the un-normalised network
            (``module`` is an importable name or a ``.py`` file among ``files``), or None.
        exported: a ``torch.export`` program of the un-normalised network (no CAM or
            attention methods: its layers cannot be hooked).
        labels: class names, index order.
        input_size: ``(C, H, W)``.
        mean, std: the normalisation the network expects, in ``[0, 1]`` pixel units.
        target_layer: the CAM layer, as named in the network (``layer4``) or inside the
            pixel-space wrapper (``model.layer4``); ``None`` finds it
            (:func:`service.archive_layers.choose_layers`); ``archive`` refuses a given
            layer that cannot be one.
        out_dir: where the ``.mar`` goes.
        files: the model file, its weights, and any other file or package folder it
            imports; each lands in the model's folder (a folder keeps its name, so
            ``from mypkg import layers`` works there).
        requirements: pip requirements TorchServe installs for this model alone
            (:mod:`service.model_requirements` says what is refused, and why).
        batch: TorchServe batching and workers.
        atol: logits parity bound between torch, ``.pt2`` and ``.onnx``.
        say: called with each line worth showing the user (which CAM layer, and why).

    Raises:
        ParityError: the exported forwards disagree by more than ``atol``.
        ArchiveError: see the class.
    """
    from service.runtime.export import export_artifacts  # heavy (onnx exporter): lazily

    if (eager is None) == (exported is None):
        raise ValueError("give exactly one of an eager module spec or an exported program")
    if len(mean) != input_size[0] or len(std) != input_size[0]:
        raise ValueError(f"mean and std need {input_size[0]} values each")
    required = checked_requirements(requirements)
    with tempfile.TemporaryDirectory() as tmp, restored_path():
        staging = Path(tmp) / "model"
        stage(files, staging)
        net = load_net(eager, exported, staging, requirements, Path(tmp) / "deps", say or _quiet)
        module = freeze(Normalized(net, mean, std))
        layers = _layers(module, input_size, target_layer, hookable=eager is not None)
        for line in layers.lines():
            (say or _quiet)(line)
        export_artifacts(module, input_size, staging, atol=atol)
        version = _version(staging / "model.onnx", labels, required)
        meta = ModelMeta(
            name=name,
            version=version,
            labels=tuple(labels),
            input_size=input_size,
            mean=tuple(mean),
            std=tuple(std),
            target_layer=layers.cam_layer.name if layers.cam_layer else None,
            eager=eager,
            cam_layer=layers.cam_layer,
            attention=layers.attention,
            unavailable=layers.unavailable,
        )
        (staging / META_FILE).write_text(json.dumps(meta.to_json(), indent=2))
        config = Path(tmp) / "model-config.yaml"
        config.write_text((batch or BatchConfig()).yaml(own_venv=bool(required)))
        requirements_file = None
        if required:
            requirements_file = Path(tmp) / "requirements.txt"
            requirements_file.write_text("\n".join(required) + "\n")
            (say or _quiet)(
                f"requirements: {', '.join(required)}: TorchServe installs them in this "
                "model's own venv when its worker starts; the server's packages are pinned"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        _pack(name, version, staging, config, requirements_file, out_dir)
    return out_dir / f"{name}.mar"


def _quiet(_line: str) -> None:
    return None


def _layers(
    module: torch.nn.Module,
    input_size: tuple[int, int, int],
    target_layer: str | None,
    *,
    hookable: bool,
) -> Layers:
    try:
        return choose_layers(module, input_size, target_layer, hookable=hookable)
    except (InvalidInputError, UnsupportedMethodError) as error:
        raise ArchiveError(f"--target-layer {target_layer}: {error}") from None


def _pack(
    name: str,
    version: str,
    staging: Path,
    config: Path,
    requirements: Path | None,
    out_dir: Path,
) -> None:
    command = [
        str(Path(sys.executable).parent / "torch-model-archiver"),
        "--model-name",
        name,
        "--version",
        version,
        "--handler",
        str(HANDLER),
        # One folder: the archiver copies its files and subfolders into the model's root.
        "--extra-files",
        str(staging),
        "--config-file",
        str(config),
        "--export-path",
        str(out_dir),
        "--force",
    ]
    if requirements is not None:
        command += ["--requirements-file", str(requirements)]
    # The archiver stages files in $TMPDIR/<model name> and deletes that folder afterwards:
    # give it a private TMPDIR so it can never touch another build's (or anyone's) files.
    with tempfile.TemporaryDirectory() as private_tmp:
        env = {**os.environ, "TMPDIR": private_tmp}
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {result.stderr.strip()}")


def _version(onnx_path: Path, labels: Sequence[str], requirements: Sequence[str]) -> str:
    digest = hashlib.sha256(onnx_path.read_bytes())
    digest.update("\n".join(labels).encode())
    digest.update("\n".join(requirements).encode())
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
    path = build_archive(
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
    # The default archive ships a CRAFT bank (a few seconds: bench/results/concepts.md).
    from service.archive_concepts import (
        DEFAULT_IMAGES_PER_CLASS,
        add_concepts,
        default_concept_images,
    )

    add_concepts(
        path,
        default_concept_images(),
        source=f"synthetic training set, {DEFAULT_IMAGES_PER_CLASS} images per class",
    )
    return path
