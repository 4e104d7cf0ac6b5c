"""The convolution that sees the pixels: its input gradient, and the normalisation before it.

Two costs sit at the very start of an input-gradient pass that the rest of the network
does not have:

* **The input gradient of the first convolution.** It is a transposed convolution from
  the first layer's channels (64 on ResNet-18) down to the image's 3, and oneDNN runs that
  5x slower than the forward convolution on this CPU (25 ms against 4.6 ms for ResNet-18's
  7x7/2 stem at batch 8): its kernels are built for many output channels. Split by output
  phase, a stride-``s`` transposed convolution is ``s * s`` ordinary stride-1 convolutions
  of the incoming gradient (Dumoulin & Visin 2016, "A guide to convolution arithmetic";
  the sub-pixel convolution of Shi et al. 2016 read backwards). Stacked as one convolution
  with ``3 * s * s`` output channels and interleaved (the permutation ``pixel_shuffle``
  does), it takes the same multiply-adds as the forward and runs at forward speed: 8 ms for
  the convolution, about 10 ms with the interleave and crop.
* **Pixel normalisation.** ``(x - mean) / std`` costs a subtraction and a division in the
  forward and a division in the backward, each a pass over the input batch (8% of a
  gradient pass on the default 128x128 model, by the profiler). ``1 / std`` folds into the
  convolution's weights per input channel; the subtraction stays, because the
  convolution's zero padding must stay zero *after* normalisation, i.e. the mean in pixel
  units.

:func:`fold_input_convolution` replaces the first convolution by :class:`InputConv2d`,
whose backward is the phase-split convolution, and drops the normalisation into it when
the model is a :class:`service.runtime.wrap.Normalized`. The optimiser checks the result
against the original and times it, as for the other rewrites.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.runtime.wrap import Normalized

DUMOULIN_2016 = "https://arxiv.org/abs/1603.07285"


def phase_kernel(
    weight: torch.Tensor, stride: int, padding: Sequence[int], dilation: Sequence[int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The stacked stride-1 kernel that computes a convolution's input gradient by phase.

    For one spatial axis, the forward reads ``x[s*i + u*d - p]`` with tap ``u``, so the
    input position ``j = s*m + r`` (phase ``r``) receives ``W[u] * g[m - q]`` from every
    tap with ``u*d - p - r = s*q``. Each phase is therefore a stride-1 correlation of the
    gradient ``g``; kernel index ``t = q_max - q`` makes all phases share one window.

    Args:
        weight: ``(O, C, kh, kw)`` forward weight (``groups == 1``).
        stride: the (square) stride ``s``.
        padding: ``(ph, pw)`` forward zero padding.
        dilation: ``(dh, dw)``.

    Returns:
        ``(K, (q_max_h, q_max_w))``: ``K`` of shape ``(C * s * s, O, Th, Tw)``, ordered as
        ``pixel_shuffle`` expects (channel ``c * s * s + r_h * s + r_w``), and the offsets
        of the first kernel tap.
    """
    out_ch, in_ch = weight.shape[:2]
    taps: list[list[tuple[int, int, int]]] = []  # per axis: (phase r, tap u, offset q)
    for axis in (0, 1):
        size, pad, dil = weight.shape[2 + axis], padding[axis], dilation[axis]
        taps.append(
            [
                (r, u, (u * dil - pad - r) // stride)
                for r in range(stride)
                for u in range(size)
                if (u * dil - pad - r) % stride == 0
            ]
        )
    q_max = tuple(max(q for _, _, q in axis) for axis in taps)
    q_min = tuple(min(q for _, _, q in axis) for axis in taps)
    kernel = torch.zeros(
        (stride, stride, in_ch, out_ch, q_max[0] - q_min[0] + 1, q_max[1] - q_min[1] + 1),
        dtype=weight.dtype,
        device=weight.device,
    )
    transposed = weight.detach().transpose(0, 1)  # (C, O, kh, kw)
    for r_h, u_h, q_h in taps[0]:
        for r_w, u_w, q_w in taps[1]:
            kernel[r_h, r_w, :, :, q_max[0] - q_h, q_max[1] - q_w] = transposed[:, :, u_h, u_w]
    kernel = kernel.permute(2, 0, 1, 3, 4, 5).reshape(
        in_ch * stride * stride, out_ch, *kernel.shape[-2:]
    )
    return kernel.contiguous(), (q_max[0], q_max[1])


def phase_input_gradient(
    grad: torch.Tensor,
    kernel: torch.Tensor,
    q_max: tuple[int, int],
    stride: int,
    input_size: tuple[int, int],
) -> torch.Tensor:
    """``d/dx`` of a convolution from its output gradient, by :func:`phase_kernel`'s kernel.

    Args:
        grad: ``(N, O, Hg, Wg)`` gradient of the convolution's output.
        kernel: from :func:`phase_kernel`.
        q_max: from :func:`phase_kernel`.
        stride: the forward stride.
        input_size: ``(H, W)`` of the forward input.

    Returns:
        ``(N, C, H, W)``, equal to ``conv_transpose2d`` of ``grad`` with the forward weight.
    """
    phases = [math.ceil(size / stride) for size in input_size]  # rows per phase
    pads, starts = [], []
    for axis in (0, 1):
        taps, q, rows = kernel.shape[2 + axis], q_max[axis], phases[axis]
        # Zero padding large enough for row 0 (offset -q) and the last row of the phase.
        pad = max(0, q, rows - 1 - q - grad.shape[2 + axis] + taps)
        pads.append(pad)
        starts.append(pad - q)
    out = F.conv2d(grad, kernel, padding=(pads[0], pads[1]))
    out = out[:, :, starts[0] : starts[0] + phases[0], starts[1] : starts[1] + phases[1]]
    if stride > 1:  # interleave the phases; what pixel_shuffle does, at 2x its speed here
        n, channels = out.shape[0], out.shape[1] // (stride * stride)
        out = (
            out.unflatten(1, (channels, stride, stride))
            .permute(0, 1, 4, 2, 5, 3)
            .reshape(n, channels, phases[0] * stride, phases[1] * stride)
        )
    return out[:, :, : input_size[0], : input_size[1]]


class _PhaseGradConv(torch.autograd.Function):
    """``conv2d`` whose input gradient is :func:`phase_input_gradient` (weights frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: InputConv2d) -> torch.Tensor:  # type: ignore[override]
        ctx.conv = conv
        ctx.input_size = (x.shape[-2], x.shape[-1])
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        conv: InputConv2d = ctx.conv
        # Under autocast the gradient arrives in bfloat16/float16; match it explicitly.
        kernel, q_max, stride = conv.phase_kernel.to(grad.dtype), conv.q_max, conv.stride[0]
        return phase_input_gradient(grad, kernel, q_max, stride, ctx.input_size), None


class InputConv2d(nn.Module):
    """A frozen ``Conv2d`` on pixels, with the input normalisation folded in.

    Computes ``conv((x - mean) / std)`` as ``conv'(x - mean)`` with ``W' = W / std`` per
    input channel, and takes its input gradient by phase-split convolution
    (:func:`phase_input_gradient`). Only gradients with respect to the input exist: the
    weights are buffers.

    Args:
        conv: the convolution (``groups == 1``, equal strides, numeric zero padding).
        mean: per-channel mean subtracted before it, or ``None``.
        std: per-channel standard deviation it divides by, or ``None``.

    Paper: https://arxiv.org/abs/1603.07285
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    shift: torch.Tensor | None
    phase_kernel: torch.Tensor

    def __init__(
        self,
        conv: nn.Conv2d,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not supports(conv):
            raise ValueError(f"cannot take the input gradient of {conv} by phases")
        weight = conv.weight.detach().double()
        if std is not None:
            weight = weight / std.detach().double().view(1, -1, 1, 1)
        self.register_buffer("weight", weight.to(conv.weight.dtype))
        bias = None if conv.bias is None else conv.bias.detach().clone()
        self.register_buffer("bias", bias)
        self.register_buffer("shift", None if mean is None else mean.detach().view(1, -1, 1, 1))
        self.stride = (int(conv.stride[0]), int(conv.stride[1]))
        self.padding = (int(conv.padding[0]), int(conv.padding[1]))  # type: ignore[index]
        self.dilation = (int(conv.dilation[0]), int(conv.dilation[1]))
        kernel, self.q_max = phase_kernel(weight, self.stride[0], self.padding, self.dilation)
        self.register_buffer("phase_kernel", kernel.to(conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            x = x - self.shift
        if not x.requires_grad:  # inference or Grad-CAM before its layer: no graph at all
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return _PhaseGradConv.apply(x, self)  # type: ignore[no-any-return]


def supports(conv: nn.Module) -> bool:
    """Whether :class:`InputConv2d` can stand in for ``conv``."""
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.stride[0] == conv.stride[1]
    )


class Pixels(nn.Module):
    """What a :class:`Normalized` becomes once its normalisation lives in the first layer.

    Keeps the wrapped model as ``model``, so every layer name stays valid.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # type: ignore[no-any-return]


def input_convolution(model: nn.Module, example: torch.Tensor) -> str | None:
    """Name of the ``Conv2d`` that the pixels (or the normalised pixels) go into first.

    Found with hooks on one forward of ``example``: the convolution must receive the very
    tensor the model (or a :class:`Normalized`'s inner model) was called with, and run
    once. Whether that tensor also feeds something else is not visible to hooks; the
    optimiser's numerical check catches it.
    """
    inner = model.model if isinstance(model, Normalized) else model
    names = {id(m): n for n, m in model.named_modules()}
    seen: dict[str, int] = {}
    entry: list[torch.Tensor] = []
    found: list[str] = []

    def on_entry(_m: nn.Module, args: tuple[object, ...]) -> None:
        if not entry and args and isinstance(args[0], torch.Tensor):
            entry.append(args[0])

    def on_conv(module: nn.Module, args: tuple[object, ...]) -> None:
        name = names[id(module)]
        seen[name] = seen.get(name, 0) + 1
        if entry and args and args[0] is entry[0]:
            found.append(name)

    handles = [inner.register_forward_pre_hook(on_entry)]
    try:
        handles += [
            m.register_forward_pre_hook(on_conv)
            for m in model.modules()
            if isinstance(m, nn.Conv2d)
        ]
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if len(found) != 1 or seen[found[0]] != 1:
        return None
    return found[0]


def fold_input_convolution(model: nn.Module, conv_name: str) -> nn.Module:
    """``model`` (changed in place, or a :class:`Pixels` around its inner model) with the
    convolution ``conv_name`` replaced by an :class:`InputConv2d`.

    For a :class:`Normalized` model, the normalisation moves into that layer.
    """
    conv = model.get_submodule(conv_name)
    assert isinstance(conv, nn.Conv2d)
    parent_name, _, child = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(model, Normalized):
        setattr(parent, child, InputConv2d(conv, model.mean.view(-1), model.std.view(-1)))
        return Pixels(model.model)
    setattr(parent, child, InputConv2d(conv))
    return model
