"""Make a model cheaper to explain without changing what it computes.

What costs time in an input gradient on CPU, and what is done about it here:

* **Batch norm** (:mod:`.batchnorm_fold`). An eval-mode ``BatchNorm2d`` after a
  convolution folds into that convolution's weights and bias, and is replaced by
  ``nn.Identity`` *in place*, so every module name stays valid: a CAM target layer such
  as ``model.features.5`` still resolves and still outputs the same tensor.
* **Memory layout** (:mod:`.channels_last`). oneDNN convolutions on CPU run natively on
  channels-last (NHWC) tensors; whether it pays depends on the model and the device, so it
  is measured on the example shape (``channels_last="auto"``).
* **The input convolution** (:mod:`.stem`). Its input gradient (a transposed convolution
  down to 3 channels) is slow in oneDNN, and a :class:`service.runtime.wrap.Normalized`
  model divides by ``std`` before it: the stem takes that gradient as a phase-split
  ordinary convolution and folds ``1 / std`` into the weights, kept where it is measured
  faster (``input_conv="auto"``).
* **Frozen parameters.** No parameter requires grad, so autograd neither keeps the
  tensors a weight gradient would need nor computes one: only ``d/d input`` is built.

The result is checked against the original on random inputs in float64 (:mod:`.checks`:
logits, the input gradient, and the outputs of the layers in ``keep``); a fold that does
not reproduce them is dropped, so an unusual model (a convolution whose output is also
used elsewhere, a shared batch norm) is served unoptimised rather than wrong.

Also here (:mod:`.chunks`): :func:`choose_chunk_size`, rows per model pass for the
sampling methods (SmoothGrad, Integrated Gradients), measured per device.

All of it runs once, when a model is loaded for serving: the engine receives the result
and never imports this package.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from service.engine.modules import device_and_dtype, freeze
from service.runtime.optimize import stem
from service.runtime.optimize.batchnorm_fold import conv_bn_pairs, fold_all
from service.runtime.optimize.channels_last import channels_last_gain, to_channels_last
from service.runtime.optimize.checks import check_rewrite
from service.runtime.optimize.chunks import activation_bytes_per_image, choose_chunk_size
from service.runtime.optimize.timing import example_inputs, measured_gain

__all__ = [
    "OptimizeReport",
    "activation_bytes_per_image",
    "choose_chunk_size",
    "optimize_for_inference",
]

logger = logging.getLogger(__name__)

ChannelsLast = bool | Literal["auto"]
DEFAULT_MEASURE_BATCH = 8
CHANNELS_LAST_MIN_GAIN = 0.05  # below a 5% gain, noise could have picked it: stay NCHW
# The input-convolution rewrite computes the same function (checked in float64) and never
# costs more work, so any measured gain keeps it: with a 5% bar, timing noise on a shared
# 2-core machine dropped it on ResNet-18 in one run of two (measured +4% there, +11% alone).
INPUT_CONV_MIN_GAIN = 0.0


@dataclass
class OptimizeReport:
    """What :func:`optimize_for_inference` did, for logs and benchmarks."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv, batch norm) names
    channels_last: bool = False
    channels_last_gain: float | None = None  # measured 1 - t(NHWC) / t(NCHW)
    input_conv: str | None = None  # the convolution replaced by stem.InputConv2d
    input_conv_gain: float | None = None  # measured 1 - t(with) / t(without)
    notes: list[str] = field(default_factory=list)


def optimize_for_inference(
    model: nn.Module,
    example_shape: Sequence[int],
    *,
    keep: Collection[str] = (),
    fold_batch_norm: bool = True,
    channels_last: ChannelsLast = "auto",
    input_conv: ChannelsLast = "auto",
    report: OptimizeReport | None = None,
) -> nn.Module:
    """An equivalent frozen copy of ``model`` that is faster to differentiate.

    Args:
        model: pixel-space classifier (``(N, C, H, W) -> (N, K)``); left untouched.
        example_shape: ``(C, H, W)`` or ``(N, C, H, W)`` of the inputs it will see; used to
            find the conv -> batch-norm pairs, to check the result and to time layouts.
        keep: module names whose outputs must stay exactly what they were (the CAM
            target layer): a convolution named here is not folded.
        fold_batch_norm: fold eval-mode ``BatchNorm2d`` into the preceding ``Conv2d``.
        channels_last: ``True``/``False`` to force the layout, ``"auto"`` to time one
            input-gradient pass in each layout and keep NHWC only if it is faster.
        input_conv: replace the first convolution by :class:`.stem.InputConv2d`
            (``True``/``False``), or ``"auto"`` to keep it only if one input-gradient pass is
            faster with it.
        report: filled with what was done, when given.

    Returns:
        A new module in eval mode with every parameter frozen; same module names.
    """
    report = report if report is not None else OptimizeReport()
    shape = _batch_shape(example_shape)
    device, dtype = device_and_dtype(model)
    optimized = freeze(copy.deepcopy(model))
    keep = {name for name in keep if name}  # "" would name the whole model

    if fold_batch_norm:
        pairs = [p for p in conv_bn_pairs(optimized, shape, device, dtype) if p[0] not in keep]
        if pairs:
            problem = check_rewrite(
                optimized, fold_all(pairs), shape, device, dtype, keep, fallback_rtol=1e-3
            )
            if problem is None:
                fold_all(pairs)(optimized)
                report.folded = pairs
            else:
                report.notes.append(f"batch norm not folded: {problem}")
                logger.warning("batch norm left unfolded: %s", problem)

    if input_conv:
        optimized = _fold_input_conv(optimized, shape, device, dtype, keep, input_conv, report)

    use_nhwc = channels_last
    if channels_last == "auto":
        gain = channels_last_gain(optimized, shape, device, dtype)
        report.channels_last_gain = gain
        use_nhwc = gain >= CHANNELS_LAST_MIN_GAIN
    if use_nhwc:
        optimized = to_channels_last(optimized)
        report.channels_last = True
    return freeze(optimized)


def _batch_shape(example_shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(int(d) for d in example_shape)
    if len(dims) == 3:
        return (DEFAULT_MEASURE_BATCH, *dims)
    if len(dims) == 4:
        return dims
    raise ValueError(f"example_shape must be (C, H, W) or (N, C, H, W), got {dims}")


def _fold_input_conv(
    model: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    keep: Collection[str],
    mode: ChannelsLast,
    report: OptimizeReport,
) -> nn.Module:
    """``model`` with :func:`stem.fold_input_convolution` applied where it is right and pays."""
    name = stem.input_convolution(model, example_inputs((1, *shape[1:]), device, dtype, seed=0))
    if name is None or name in keep or not stem.supports(model.get_submodule(name)):
        report.notes.append("input convolution kept: none found that can be replaced")
        return model

    def rewrite(copy_of_model: nn.Module) -> nn.Module:
        return stem.fold_input_convolution(copy_of_model, name)

    problem = check_rewrite(model, rewrite, shape, device, dtype, keep, fallback_rtol=None)
    if problem is not None:
        report.notes.append(f"input convolution kept: {problem}")
        return model
    candidate = rewrite(copy.deepcopy(model))
    if mode == "auto":
        report.input_conv_gain = measured_gain(model, candidate, shape, device, dtype)
        if report.input_conv_gain <= INPUT_CONV_MIN_GAIN:
            return model
    report.input_conv = name
    return freeze(candidate)
