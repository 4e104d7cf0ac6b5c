"""What the engine and the load-time code both ask of any ``nn.Module``.

Here, in the engine, because the engine may import nothing from the rooms above it
(``service.runtime``, ``service.models``), while they may import the engine: one freeze
idiom and one answer to "where do its weights live" serve all of them.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def freeze(module: M) -> M:
    """Put ``module`` in eval mode with every parameter frozen; returns the same object.

    Frozen parameters mean autograd builds only ``d/d input``: it neither keeps the
    tensors a weight gradient would need nor computes one.

    Args:
        module: any module, including a ``torch.export`` program's ``module()``.

    Returns:
        ``module`` itself, for chaining.
    """
    # An exported program's module() refuses eval() (torch 2.13); it is already in the mode
    # it was exported in, so there is nothing to switch.
    with contextlib.suppress(NotImplementedError):
        module.eval()
    module.requires_grad_(False)
    return module


def device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of ``module``'s first parameter or buffer.

    Args:
        module: any module.

    Returns:
        ``(device, dtype)``; CPU and float32 for a module without tensors, float32 when
        the first tensor is not floating point.
    """
    first = next(iter([*module.parameters(), *module.buffers()]), None)
    if first is None:
        return torch.device("cpu"), torch.float32
    dtype = first.dtype if first.dtype.is_floating_point else torch.float32
    return first.device, dtype
