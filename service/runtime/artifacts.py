"""A served model's files (``model.json``, gradient artifact, ``model.onnx``) and their loading.

``model.json`` is the contract between ``saliency-serve archive`` and every host:

    {"name", "version", "labels", "input_size": [C, H, W], "mean", "std",
     "target_layer": "model.features.3" | null,
     "cam_layer": CamLayer.to_json() | null,      # kind, grid, prefix tokens, how chosen
     "attention": AttentionInfo.to_json() | null, # layers, heads, tokens, grid, readout
     "unavailable": {"layer": "why no CAM layer", "attention": "why no attention"},
     "eager": {"module": "pkg.mod" | "model.py", "class": "Net", "kwargs": {...},
               "weights": "weights.pt"} | null}

The gradient model is the eager module when ``eager`` is given (CAM methods hook its named
layers, attention methods capture its attention), else the exported program ``model.pt2``.
Predictions and forward-only methods always run on ``model.onnx`` through ONNX Runtime. An
older ``model.json`` with a ``target_layer`` but no ``cam_layer`` has that layer checked
when it is loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.engine.attention_info import AttentionInfo
from service.engine.cam_layer import CamLayer
from service.engine.engine import Engine
from service.engine.modules import freeze
from service.runtime.onnx_forward import OnnxForward, cpu_quota
from service.runtime.optimize import choose_chunk_size, optimize_for_inference
from service.runtime.optimize.precision import choose_precision
from service.runtime.ort_choice import OrtChoice, OrtSettings
from service.runtime.ort_shared import choose_for_model
from service.runtime.wrap import Normalized

META_FILE = "model.json"
PT2_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
NOT_HOOKABLE = (
    "the model was archived as a torch.export program, whose layers cannot be hooked: "
    "archive the eager module (--model-file) for CAM and attention methods"
)


@dataclass(frozen=True)
class ModelMeta:
    """The parsed ``model.json``."""

    name: str
    version: str
    labels: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_layer: str | None = None
    eager: dict[str, Any] | None = None
    cam_layer: CamLayer | None = None
    attention: AttentionInfo | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # "layer" / "attention": why
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir: Path) -> ModelMeta:
        raw = json.loads((model_dir / META_FILE).read_text())
        known = {
            *("name", "version", "labels", "input_size", "mean", "std", "target_layer"),
            *("eager", "cam_layer", "attention", "unavailable"),
        }
        channels, height, width = (int(v) for v in raw["input_size"])
        cam_layer, attention = raw.get("cam_layer"), raw.get("attention")
        return cls(
            name=raw["name"],
            version=str(raw["version"]),
            labels=tuple(raw["labels"]),
            input_size=(channels, height, width),
            mean=tuple(float(v) for v in raw["mean"]),
            std=tuple(float(v) for v in raw["std"]),
            target_layer=raw.get("target_layer"),
            eager=raw.get("eager"),
            cam_layer=CamLayer.from_json(cam_layer) if cam_layer else None,
            attention=AttentionInfo.from_json(attention) if attention else None,
            unavailable={str(k): str(v) for k, v in (raw.get("unavailable") or {}).items()},
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "target_layer": self.target_layer,
            "cam_layer": self.cam_layer.to_json() if self.cam_layer else None,
            "attention": self.attention.to_json() if self.attention else None,
            "unavailable": self.unavailable,
            "eager": self.eager,
            **self.extra,
        }


@dataclass
class ModelBundle:
    """Everything a host needs to serve one model."""

    meta: ModelMeta
    engine: Engine
    forward: OnnxForward
    gradient_source: str  # "eager" or "pt2"
    ort_choice: OrtChoice | None = None  # the forward's settings and their timings


def build_eager_net(spec: dict[str, Any], model_dir: Path) -> torch.nn.Module:
    """Instantiate the user's module class (importable module or a file shipped beside).

    While the model file runs, ``model_dir`` is on ``sys.path``, so a package folder
    shipped beside it (``archive --extra-files mypkg``) imports as it does in a TorchServe
    worker, whose ``PYTHONPATH`` holds the model's folder.
    """
    module_ref: str = spec["module"]
    with _importable(model_dir):
        if module_ref.endswith(".py"):
            path = model_dir / module_ref
            loaded = importlib.util.spec_from_file_location(f"saliency_user_{path.stem}", path)
            if loaded is None or loaded.loader is None:
                raise ImportError(f"cannot import model file {path}")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_ref)
        net: torch.nn.Module = getattr(module, spec["class"])(**spec.get("kwargs", {}))
    weights = spec.get("weights")
    if weights:
        state = torch.load(model_dir / weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return net


@contextlib.contextmanager
def _importable(folder: Path) -> Iterator[None]:
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def load_gradient_model(meta: ModelMeta, model_dir: Path) -> tuple[torch.nn.Module, str]:
    """The differentiable pixel-space module and where it came from."""
    if meta.eager:
        net = build_eager_net(meta.eager, model_dir)
        return freeze(Normalized(net, meta.mean, meta.std)), "eager"
    program = torch.export.load(model_dir / PT2_FILE)
    return freeze(program.module()), "pt2"


def load_bundle(
    model_dir: Path,
    *,
    device: str = "cpu",
    intra_op_threads: int | None = None,
    precision: str = "float32",
) -> ModelBundle:
    """Load ``model_dir`` for serving on ``device`` ("cpu" or "cuda[:N]").

    ``precision`` is the torch methods' (:class:`service.engine.engine.Engine`); the ONNX
    forward always runs the exported float32 graph.
    """
    meta = ModelMeta.read(model_dir)
    model, source = load_gradient_model(meta, model_dir)
    model = model.to(device)
    # Same function, faster gradients: batch norm folded, channels-last where it pays.
    layer = meta.cam_layer.name if meta.cam_layer else meta.target_layer
    model = optimize_for_inference(model, meta.input_size, keep=[layer or ""])
    # Rows per pass for SmoothGrad and IG, timed on this device: on the development CPU 32
    # rows per pass did the default model's rows 1.5x faster than 8, and a GPU wants more.
    chunk_size, _ = choose_chunk_size(model, meta.input_size, repeats=2)
    # Autocast only where it measures faster here (it was 16x slower on a depthwise CNN).
    precision = choose_precision(model, (8, *meta.input_size), precision).chosen
    # Session options and rows per run of the forward-only methods, timed on this model
    # (CPU; a GPU keeps the defaults: its batch wants the device's own measurement).
    ort_default = OrtSettings(intra_op_threads or cpu_quota(), chunk=chunk_size)
    if device.startswith("cuda"):
        ort_choice = OrtChoice(ort_default)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        ort_choice = choose_for_model(model_dir / ONNX_FILE, meta.input_size, ort_default)
        providers = ["CPUExecutionProvider"]
    forward = ort_choice.settings.forward(model_dir / ONNX_FILE, providers)
    hookable = source == "eager"
    engine = Engine(
        model,
        target_layer=(meta.cam_layer or meta.target_layer) if hookable else None,
        attention=meta.attention if hookable else None,
        unavailable=meta.unavailable
        if hookable
        else {"layer": NOT_HOOKABLE, "attention": NOT_HOOKABLE},
        input_shape=meta.input_size,
        forward_numpy=forward,
        chunk_size=chunk_size,
        forward_chunk_size=ort_choice.settings.chunk,
        precision=precision,
    )
    return ModelBundle(
        meta=meta, engine=engine, forward=forward, gradient_source=source, ort_choice=ort_choice
    )
