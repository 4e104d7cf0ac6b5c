"""The default model: trained once, cached, accurate, and shaped for CAM methods."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from service.models import default as default_mod
from service.models.default import cache_dir, ensure_default_model, load_default_model
from service.models.net import DEFAULT_TARGET_LAYER, SaliencyNet
from service.models.synthetic import CLASS_NAMES, IMAGE_SIZE, generate
from service.models.train import TrainConfig, accuracy
from service.runtime.wrap import Normalized

Model = tuple[nn.Module, dict[str, Any]]
# Fresh images: neither the held-out seed nor any training seed (1_000_000 + step).
FRESH_SEED = 424242
TINY = TrainConfig(image_size=32, width=4, steps=2, batch_size=10, heldout_n=10)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALIENCY_SERVE_CACHE", "/some/where")
    assert cache_dir() == Path("/some/where/default-model")
    monkeypatch.delenv("SALIENCY_SERVE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "saliency-serve" / "default-model"


def test_second_call_is_cached(default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta_file = default_model_dir / "meta.json"
    before = meta_file.stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again although the cache is current")

    monkeypatch.setattr(default_mod, "_train_into", no_training)
    assert ensure_default_model(progress=False) == default_model_dir
    assert meta_file.stat().st_mtime_ns == before


def test_meta_contents(default_model_dir: Path) -> None:
    meta = json.loads((default_model_dir / "meta.json").read_text())
    assert meta["name"] == "shapes-cnn"
    assert isinstance(meta["version"], str) and len(meta["version"]) >= 8
    assert meta["labels"] == list(CLASS_NAMES)
    assert meta["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert len(meta["mean"]) == len(meta["std"]) == 3
    assert all(0 < s < 1 for s in meta["std"])
    assert meta["target_layer"] == DEFAULT_TARGET_LAYER
    assert meta["held_out_accuracy"] >= 0.97
    # How long training took is the training machine's business (a bench figure), not a
    # property of the model: only that it was recorded.
    assert isinstance(meta["train_seconds"], float) and meta["train_seconds"] > 0
    assert meta["config_hash"] == TrainConfig().digest()
    assert (default_model_dir / "weights.pt").is_file()


def test_loaded_model_is_frozen_pixel_space(default_model: Model) -> None:
    model, _ = default_model
    assert isinstance(model, Normalized)
    assert isinstance(model.model, SaliencyNet)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # Hooks and captum need ReLUs that keep their input.
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_target_layer_is_a_16x16_feature_map(default_model: Model) -> None:
    model, meta = default_model
    layer = dict(model.named_modules())[meta["target_layer"]]
    seen: list[torch.Size] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            model(torch.rand(2, *meta["input_size"]))
    finally:
        handle.remove()
    assert seen[0][0] == 2
    assert tuple(seen[0][2:]) == (16, 16)


def test_held_out_accuracy_on_fresh_images(default_model: Model) -> None:
    model, _ = default_model
    data = generate(500, FRESH_SEED)
    acc = accuracy(model, data.images, data.labels)
    assert acc >= 0.97, f"held-out accuracy {acc:.3f} on seed {FRESH_SEED}"


# The cache mechanics below use a tiny configuration in a temporary directory (seconds).


def test_trains_once_then_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "default-model"
    assert ensure_default_model(target, progress=False, config=TINY) == target
    meta = json.loads((target / "meta.json").read_text())
    assert meta["input_size"] == [3, 32, 32]
    assert meta["config_hash"] == TINY.digest()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again although the cache is current")

    monkeypatch.setattr(default_mod, "_train_into", no_training)
    assert ensure_default_model(target, progress=False, config=TINY) == target
    model, meta2 = load_default_model(target, config=TINY)
    assert meta2 == meta
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, len(CLASS_NAMES))


def test_changed_config_retrains(tmp_path: Path) -> None:
    target = tmp_path / "default-model"
    ensure_default_model(target, progress=False, config=TINY)
    first = json.loads((target / "meta.json").read_text())
    other = TrainConfig(image_size=32, width=4, steps=3, batch_size=10, heldout_n=10)
    ensure_default_model(target, progress=False, config=other)
    second = json.loads((target / "meta.json").read_text())
    assert second["config_hash"] == other.digest() != first["config_hash"]
    assert second["version"] != first["version"]
    # Nothing left behind but the model and its lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default-model", "default-model.lock"]


def test_killed_run_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "default-model"
    real = default_mod._train_into

    def dies_halfway(directory: Path, cfg: TrainConfig, progress: bool) -> None:
        (directory / "weights.pt").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_mod, "_train_into", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(target, progress=False, config=TINY)
    assert not target.exists()
    # A leftover from a run killed harder (no cleanup) is removed by the next run.
    (tmp_path / ".default-model-tmp-stale").mkdir()
    monkeypatch.setattr(default_mod, "_train_into", real)
    ensure_default_model(target, progress=False, config=TINY)
    assert not (tmp_path / ".default-model-tmp-stale").exists()
    assert (target / "meta.json").is_file()


def test_concurrent_callers_train_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that finds no cache while another trains waits for it instead of training.

    No sleep decides the interleaving: the trainer holds the lock until the second caller
    has seen the cache missing, so the second caller must go through the lock.
    """
    target = tmp_path / "default-model"
    real_train, real_is_current = default_mod._train_into, default_mod._is_current
    calls: list[str] = []
    results: list[Path] = []
    second_saw_no_cache = threading.Event()
    second = threading.Thread(
        target=lambda: results.append(ensure_default_model(target, False, config=TINY)),
        name="second-caller",
    )

    def watching(directory: Path, cfg: TrainConfig) -> bool:
        current = real_is_current(directory, cfg)
        if threading.current_thread() is second and not current:
            second_saw_no_cache.set()
        return current

    def counting(directory: Path, cfg: TrainConfig, progress: bool) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:  # the first trainer, holding the lock
            second.start()
            assert second_saw_no_cache.wait(timeout=60), "the second caller never arrived"
        real_train(directory, cfg, progress)

    monkeypatch.setattr(default_mod, "_is_current", watching)
    monkeypatch.setattr(default_mod, "_train_into", counting)
    results.append(ensure_default_model(target, False, config=TINY))
    second.join(timeout=120)
    assert not second.is_alive()
    assert sorted(results) == [target, target]
    assert calls == [threading.current_thread().name]


def test_generator_failure_stops_training(monkeypatch: pytest.MonkeyPatch) -> None:
    # The batch thread must hand its error to the training loop, not leave it waiting.
    from service.models import train as train_mod

    real = train_mod.synthetic.generate

    def broken(n: int, seed: int, size: int = 128) -> Any:
        if seed >= TINY.train_seed_base + 1:  # the second training batch
            raise RuntimeError("generator broke")
        return real(n, seed, size)

    monkeypatch.setattr(train_mod.synthetic, "generate", broken)
    with pytest.raises(RuntimeError, match="generator broke"):
        train_mod.train(TINY, progress=False)
