"""Channels-last (NHWC) layout for a model whose input gradient is wanted.

oneDNN convolutions on CPU run natively on channels-last tensors; NCHW pays for reorders
in both passes. Whether it pays depends on the model and the device, so the optimiser
measures it on the example shape (:func:`channels_last_gain`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from service.runtime.optimize.timing import measured_gain


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity forward; the backward hands the gradient on in channels-last layout."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class ChannelsLastGradPool(nn.AdaptiveAvgPool2d):
    """``AdaptiveAvgPool2d`` whose input gradient comes back channels-last.

    The pooling backward writes an NCHW gradient, while the ReLU before it saved its
    output channels-last; ``threshold_backward`` over two layouts runs an elementwise loop
    that is tens of times slower than over one (0.13 ms vs 5 ms for 1M floats on this
    CPU). One reorder here keeps every ReLU backward on the fast path.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(_ChannelsLastGrad.apply(input))


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` (in place) with 4-D weights channels-last and its global pools swapped."""
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for name, module in list(model.named_modules()):
        if name and type(module) is nn.AdaptiveAvgPool2d:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ChannelsLastGradPool(module.output_size))
    return model


def channels_last_gain(
    model: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> float:
    """``1 - t(NHWC) / t(NCHW)`` of one input-gradient pass on ``shape``."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return 0.0
    nhwc = to_channels_last(copy.deepcopy(model))
    return measured_gain(model, nhwc, shape, device, dtype)
