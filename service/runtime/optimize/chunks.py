"""Rows per model pass for the sampling methods, chosen by measurement on the serving device.

SmoothGrad (``n_samples x B`` rows) and Integrated Gradients (``n_steps x B``) run their
rows through the model ``chunk_size`` at a time; :func:`choose_chunk_size` times the
candidates that fit in memory and keeps the one with the most rows per second.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from service.engine.modules import device_and_dtype
from service.runtime.optimize.timing import example_inputs, gradient_pass, time_interleaved

CHUNK_CANDIDATES = (8, 16, 32, 64, 128)
CHUNK_MEMORY_FRACTION = 0.25  # of free GPU memory one chunk's activations may take
CPU_CHUNK_MEMORY = 1 << 30  # bytes one chunk's activations may take on a CPU


def choose_chunk_size(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    candidates: Sequence[int] = CHUNK_CANDIDATES,
    repeats: int = 3,
    memory_budget: int | None = None,
) -> tuple[int, dict[int, float]]:
    """Rows per input-gradient pass that give the most rows per second on this device.

    Sampling methods (SmoothGrad: ``n_samples x B`` rows, Integrated Gradients: ``n_steps x
    B``) run their rows through the model ``chunk_size`` at a time. Too small a chunk
    leaves the cores idle between small kernels; too large a chunk spills activations out
    of cache (CPU) or device memory (GPU). Candidates whose activations exceed the memory
    budget are not tried.

    Args:
        model: the (optimised) model.
        input_shape: ``(C, H, W)``.
        candidates: chunk sizes to try, ascending.
        repeats: timed passes per candidate (the fastest counts).
        memory_budget: bytes one chunk's activations may take; default a quarter of the
            free memory on a GPU, ``CPU_CHUNK_MEMORY`` on a CPU.

    Returns:
        ``(best chunk size, {chunk size: seconds per row})``; the smallest candidate when
        none fits.
    """
    device, dtype = device_and_dtype(model)
    shape = tuple(int(d) for d in input_shape[-3:])
    if memory_budget is None:
        free = _free_device_bytes(device)
        memory_budget = int(CHUNK_MEMORY_FRACTION * free) if free is not None else CPU_CHUNK_MEMORY
    per_image = activation_bytes_per_image(model, shape)
    per_row: dict[int, float] = {}
    for size in candidates:
        if size * per_image > memory_budget:
            break
        inputs = example_inputs((size, *shape), device, dtype, seed=3)
        (seconds,) = time_interleaved([gradient_pass(model, inputs)], device, repeats)
        per_row[size] = seconds / size
    if not per_row:
        return min(candidates), per_row
    best = min(per_row, key=lambda s: per_row[s])
    # Within 3% of the best, prefer the smallest: same speed, less memory, finer deadlines.
    good = [s for s in per_row if per_row[s] <= 1.03 * per_row[best]]
    return min(good), per_row


def _free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def activation_bytes_per_image(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Bytes autograd keeps for the backward of one image's input gradient.

    Counts every tensor saved for backward during one forward of a batch of 2, by storage
    (a tensor saved by two ops counts once), leaving out parameters and buffers (they are
    not per image), and halves the sum.
    """
    device, dtype = device_and_dtype(model)
    shape = tuple(int(d) for d in input_shape[-3:])
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = example_inputs((2, *shape), device, dtype, seed=4)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        leaf = inputs.requires_grad_(True)
        logits = model(leaf)  # held until the sum: freed storages could reuse addresses
    del logits
    return sum(seen.values()) // 2
