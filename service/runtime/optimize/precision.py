"""The precision guard: reduced-precision autocast only where it measures faster.

bfloat16 / float16 autocast is a deployment's opt-in (``SALIENCY_PRECISION``), but it is
not always a gain: on a depthwise-convolution model (EfficientNet-Lite0, 224 px, 2 CPU
cores) a vanilla-gradient batch took 8.3 s under bfloat16 against 0.51 s in float32,
because CPUs without native bfloat16 units emulate it and oneDNN has no reduced-precision
depthwise kernels there. So at load, as for channels-last, one input-gradient pass is
timed both ways on the model and device it will serve on (:mod:`.timing`); autocast stays
only if it was faster, and otherwise the engine runs float32 and the log says why, with
both timings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from service.engine.engine import PRECISIONS
from service.engine.modules import device_and_dtype
from service.runtime.optimize.timing import example_inputs, gradient_pass, time_interleaved

logger = logging.getLogger(__name__)

Timer = Callable[[Sequence[Callable[[], None]], torch.device], list[float]]
"""Times each function on the device: ``time_interleaved``, or a stand-in in tests."""


@dataclass(frozen=True)
class PrecisionChoice:
    """What the guard decided and on what evidence.

    Attributes:
        asked: the configured precision.
        chosen: what the engine will run (``asked``, or ``"float32"``).
        float32_seconds, reduced_seconds: one gradient pass each way; ``None`` when
            nothing was timed (float32 asked, or autocast failed on this device).
        reason: one line for the log.
    """

    asked: str
    chosen: str
    float32_seconds: float | None
    reduced_seconds: float | None
    reason: str


def choose_precision(
    model: nn.Module,
    example_shape: Sequence[int],
    precision: str,
    *,
    timer: Timer | None = None,
) -> PrecisionChoice:
    """``precision`` if autocast to it makes one input-gradient pass faster, else float32.

    Args:
        model: the optimised pixel-space model the engine will differentiate.
        example_shape: ``(N, C, H, W)`` of the measured batch.
        precision: a key of :data:`service.engine.engine.PRECISIONS`.
        timer: how to time the two passes (defaults to the optimiser's interleaved
            minimum of 3 runs each); tests inject the times.

    Returns:
        The decision, logged at INFO when autocast is kept and WARNING when it is not.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return PrecisionChoice(precision, precision, None, None, f"{precision} asked")
    device, model_dtype = device_and_dtype(model)
    inputs = example_inputs(tuple(example_shape), device, model_dtype, seed=3)
    plain = gradient_pass(model, inputs)

    reduced_dtype: torch.dtype = dtype

    def reduced() -> None:
        with torch.autocast(device.type, dtype=reduced_dtype):
            plain()

    measure = timer if timer is not None else _interleaved
    try:
        t_float32, t_reduced = measure([plain, reduced], device)
    except RuntimeError as error:  # autocast to this dtype unsupported on this device
        choice = PrecisionChoice(
            precision, "float32", None, None,
            f"precision {precision} asked, float32 used: autocast failed on {device} "
            f"({str(error)[:200]})",
        )  # fmt: skip
        logger.warning("%s", choice.reason)
        return choice
    timings = (
        f"one gradient pass of {tuple(example_shape)} took {t_reduced:.4f} s under "
        f"{precision} autocast and {t_float32:.4f} s in float32 on {device}"
    )
    if t_reduced < t_float32:
        choice = PrecisionChoice(
            precision, precision, t_float32, t_reduced, f"precision {precision} kept: {timings}"
        )
        logger.info("%s", choice.reason)
        return choice
    choice = PrecisionChoice(
        precision, "float32", t_float32, t_reduced,
        f"precision {precision} asked, float32 used: {timings}",
    )  # fmt: skip
    logger.warning("%s", choice.reason)
    return choice


def _interleaved(fns: Sequence[Callable[[], None]], device: torch.device) -> list[float]:
    return time_interleaved(fns, device, repeats=3)
