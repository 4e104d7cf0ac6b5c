"""Example inputs and the timing of one input-gradient pass, for the optimiser's choices.

A rewrite that computes the same function is kept only where it is measured faster on the
device the model will serve on; these helpers time variants in turn, under the same load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn


def example_inputs(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    """Uniform pixels in ``[0, 1]`` of ``shape``, the same for the same ``seed`` on any device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen).to(device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gradient_pass(model: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    """One input-gradient pass, as the engine runs it."""

    def run() -> None:
        with torch.enable_grad():
            leaf = inputs.detach().clone().requires_grad_(True)
            torch.autograd.grad(model(leaf)[:, 0].sum(), leaf)

    return run


def time_interleaved(
    fns: Sequence[Callable[[], None]], device: torch.device, repeats: int = 5
) -> list[float]:
    """Fastest of ``repeats`` runs of each function, timed in turn after a warm-up.

    The minimum, not the median: load from other processes only ever adds time, so the
    fastest run is the best estimate of what each variant costs on an idle device.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for slot, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[slot].append(time.perf_counter() - start)
    return [min(t) for t in times]


def measured_gain(
    before: nn.Module,
    after: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """``1 - t(after) / t(before)`` of one input-gradient pass on ``shape``, timed in turn."""
    inputs = example_inputs(shape, device, dtype, seed=2)
    t_before, t_after = time_interleaved(
        [gradient_pass(before, inputs), gradient_pass(after, inputs)], device
    )
    return 1.0 - t_after / t_before
