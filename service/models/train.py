"""Train the default model on synthetic shapes, on CPU, in a few minutes.

Training images are generated on the fly (every step sees new images, so there is no
overfitting to a finite set) by a background thread while torch trains on the previous
batch; the held-out set comes from seeds that training never uses.

Training knows nothing of the cache; :mod:`service.models.default` calls it
(``python -m service.models.default`` builds or finds the cached default model).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service.engine.modules import freeze
from service.models import synthetic
from service.models.net import SaliencyNet
from service.runtime.wrap import Normalized

ARCH_VERSION = 2  # bump when SaliencyNet changes in a way old weights do not fit


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights; its hash keys the cache.

    Attributes:
        image_size: height and width of the images.
        width: channels of SaliencyNet's first block.
        steps: optimiser steps.
        batch_size: images per step.
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        seed: torch seed (initialisation, dropout).
        train_seed_base: batch ``i`` is ``generate(batch_size, train_seed_base + i)``.
        heldout_seed: seed of the held-out set; far from every training seed.
        heldout_n: held-out images.
    """

    image_size: int = synthetic.IMAGE_SIZE
    width: int = 16
    steps: int = 1000
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    seed: int = 0
    train_seed_base: int = 1_000_000
    heldout_seed: int = 7
    heldout_n: int = 2000

    def digest(self) -> str:
        """Short hash of the config, the generator and the architecture versions."""
        payload = {
            **asdict(self),
            "classes": list(synthetic.CLASS_NAMES),
            "generator": synthetic.GENERATOR_VERSION,
            "arch": ARCH_VERSION,
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class TrainResult:
    """A trained pixel-space model and what was measured while training it."""

    model: Normalized
    held_out_accuracy: float
    train_seconds: float


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` images -> float32 ``(N, 3, H, W)`` pixels in ``[0, 1]``.

    The permuted view is channels-last in memory, which oneDNN convolutions prefer on CPU.
    """
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def channel_stats(size: int, n: int = 256, seed: int = 3) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of generated images, rounded so they print cleanly."""
    x = to_tensor(synthetic.generate(n, seed, size).images)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).tolist()
    return [round(m, 4) for m in mean], [round(s, 4) for s in std]


def _batches(cfg: TrainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches, generated one step ahead by a daemon thread.

    numpy and OpenCV release the GIL, so generation overlaps the torch step; the seeds do
    not depend on timing, so the stream is deterministic.
    """
    q: queue.Queue[tuple[torch.Tensor, torch.Tensor] | BaseException] = queue.Queue(maxsize=3)
    stop = threading.Event()

    def put(item: tuple[torch.Tensor, torch.Tensor] | BaseException) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for step in range(cfg.steps):
                if stop.is_set():
                    return
                seed = cfg.train_seed_base + step
                batch = synthetic.generate(cfg.batch_size, seed, cfg.image_size)
                put((to_tensor(batch.images), torch.from_numpy(batch.labels)))
        except BaseException as exc:  # handed to the training loop, which re-raises it
            put(exc)

    thread = threading.Thread(target=produce, name="synthetic-batches", daemon=True)
    thread.start()
    try:
        for _ in range(cfg.steps):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    """Top-1 accuracy of a pixel-space ``model`` on uint8 images.

    Args:
        model: takes float32 ``(N, 3, H, W)`` pixels in ``[0, 1]``; put in eval mode here.
        images: uint8 ``(N, H, W, 3)``.
        labels: int ``(N,)``.
        batch: images per forward.

    Returns:
        Fraction of images whose arg-max logit is the label.
    """
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        pred = model(to_tensor(images[i : i + batch])).argmax(dim=1).numpy()
        correct += int((pred == labels[i : i + batch]).sum())
    return correct / max(len(images), 1)


def _available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def train(cfg: TrainConfig | None = None, progress: bool = True) -> TrainResult:
    """Train SaliencyNet from scratch on synthetic shapes.

    Args:
        cfg: training configuration; ``TrainConfig()`` when omitted.
        progress: show a tqdm bar on stderr.

    Returns:
        The frozen pixel-space model with its held-out accuracy and training time.
    """
    cfg = cfg or TrainConfig()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(_available_cores())
    try:
        # A private RNG stream: training is reproducible and leaves the caller's seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = _fit(cfg, progress)
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.perf_counter() - start
    held = synthetic.generate(cfg.heldout_n, cfg.heldout_seed, cfg.image_size)
    acc = accuracy(model, held.images, held.labels)
    return TrainResult(freeze(model), acc, train_seconds)


def _fit(cfg: TrainConfig, progress: bool) -> Normalized:
    mean, std = channel_stats(cfg.image_size)
    net = SaliencyNet(len(synthetic.CLASS_NAMES), width=cfg.width)
    model = Normalized(net, mean, std)
    # oneDNN convolutions on CPU are fastest channels-last (the torch stubs miss this overload).
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # No weight decay on biases and batch-norm parameters.
    groups: list[dict[str, Any]] = [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    bar = tqdm(
        _batches(cfg),
        total=cfg.steps,
        desc="training default model",
        unit="step",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,  # CI logs keep every redraw
    )
    running = 0.0
    for step, (x, y) in enumerate(bar):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        running = 0.95 * running + 0.05 * value if step else value
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.3f}")
    bar.close()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return model
