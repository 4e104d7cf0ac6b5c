"""The cached default model: trained once, then loaded from disk.

The cache directory holds ``weights.pt`` (the ``SaliencyNet`` state dict) and
``meta.json`` (labels, input size, normalisation, CAM layer, version, accuracy). It is
written into a temporary sibling and renamed into place, so a killed run never leaves a
half-written cache, and training holds an exclusive ``fcntl`` lock, so two processes
starting at once (a test session and ``make serve``) train only once.

Run ``python -m service.models.default`` to build (or find) the cached default model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from service.engine.modules import freeze
from service.models import synthetic
from service.models.net import DEFAULT_TARGET_LAYER, SaliencyNet
from service.models.train import TrainConfig, train
from service.runtime.wrap import Normalized

MODEL_NAME = "shapes-cnn"
WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"
CACHE_ENV = "SALIENCY_SERVE_CACHE"


def cache_dir() -> Path:
    """``$SALIENCY_SERVE_CACHE/default-model``, or ``~/.cache/saliency-serve/default-model``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "saliency-serve"
    return base / "default-model"


def _resolve(directory: Path | None) -> Path:
    return Path(directory) if directory is not None else cache_dir()


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        meta: dict[str, Any] = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if (directory / WEIGHTS_FILE).is_file() else None


def _is_current(directory: Path, cfg: TrainConfig) -> bool:
    meta = _read_meta(directory)
    return meta is not None and meta.get("config_hash") == cfg.digest()


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<directory>.lock`` (blocks until the holder is done)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.parent / f"{directory.name}.lock"
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_model(
    cache_dir: Path | None = None,
    progress: bool = True,
    *,
    config: TrainConfig | None = None,
) -> Path:
    """Return the directory of the trained default model, training it first if needed.

    Training happens when the directory is missing or was trained with another
    configuration (its ``config_hash`` differs); otherwise this returns at once.

    Args:
        cache_dir: where the model lives; ``cache_dir()`` when omitted.
        progress: show the training progress bar on stderr.
        config: training configuration; ``TrainConfig()`` when omitted.

    Returns:
        The directory holding ``weights.pt`` and ``meta.json``.
    """
    target = _resolve(cache_dir)
    cfg = config or TrainConfig()
    if _is_current(target, cfg):
        return target
    with _exclusive(target):
        # Another process may have finished training while this one waited for the lock.
        if _is_current(target, cfg):
            return target
        _clear_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-tmp-", dir=target.parent))
        try:
            _train_into(tmp, cfg, progress)
            _replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _clear_leftovers(target: Path) -> None:
    # Only the lock holder writes, so any temporary sibling left now is from a killed run.
    for stale in target.parent.glob(f".{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is renamed aside first, then removed."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}-old-{os.getpid()}"
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _train_into(directory: Path, cfg: TrainConfig, progress: bool) -> None:
    result = train(cfg, progress=progress)
    normalized = result.model
    weights = directory / WEIGHTS_FILE
    torch.save(normalized.model.state_dict(), weights)
    digest = hashlib.sha256(cfg.digest().encode() + weights.read_bytes()).hexdigest()[:12]
    meta = {
        "name": MODEL_NAME,
        "version": digest,
        "labels": list(synthetic.CLASS_NAMES),
        "input_size": [3, cfg.image_size, cfg.image_size],
        # Rounded: the float32 buffers would print as 0.46000000834465027.
        "mean": [round(v, 4) for v in normalized.mean.flatten().tolist()],
        "std": [round(v, 4) for v in normalized.std.flatten().tolist()],
        "target_layer": DEFAULT_TARGET_LAYER,
        "held_out_accuracy": result.held_out_accuracy,
        "held_out": {"seed": cfg.heldout_seed, "n": cfg.heldout_n},
        "train_seconds": round(result.train_seconds, 2),
        "config_hash": cfg.digest(),
        "config": asdict(cfg),
    }
    # meta.json is written last: a directory with it is complete.
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_default_model(
    cache_dir: Path | None = None, *, config: TrainConfig | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The default model in pixel space (``Normalized(SaliencyNet)``), frozen, with its meta.

    Trains it first if the cache is missing or stale.

    Args:
        cache_dir: where the model lives; ``cache_dir()`` when omitted.
        config: training configuration; ``TrainConfig()`` when omitted.

    Returns:
        ``(model, meta)``: the model takes float32 ``(N, 3, H, W)`` pixels in ``[0, 1]``;
        ``meta`` is the parsed ``meta.json``.
    """
    directory = ensure_default_model(cache_dir, progress=True, config=config)
    meta = _read_meta(directory)
    if meta is None:
        raise RuntimeError(f"default model cache at {directory} is incomplete")
    width = int(meta.get("config", {}).get("width", TrainConfig.width))
    net = SaliencyNet(len(meta["labels"]), width=width)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return freeze(Normalized(net, meta["mean"], meta["std"])), meta


def main() -> None:
    """Build or find the cached default model and say where it is."""
    path = ensure_default_model(progress=True)
    meta = _read_meta(path) or {}
    print(f"default model: {path}")
    print(f"held-out accuracy: {meta['held_out_accuracy']:.4f}")
    print(f"train seconds: {meta['train_seconds']:.1f}")


if __name__ == "__main__":
    main()
