"""Shared plumbing of the forward-only (perturbation) methods and the faithfulness scores.

Every perturbation method has the same shape: build a chunk of perturbed inputs, run one
batched forward, fold the target scores into the map, check the deadline, repeat. What is
common lives here so that each method module only says how it perturbs and how it folds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import cv2
import numpy as np
import torch

from service.engine.errors import (
    InvalidInputError,
    TargetOutOfRangeError,
    UnsupportedMethodError,
)
from service.engine.registry import ParamValue
from service.engine.types import ExplainContext, NumpyForward

Check = Callable[[], None]


def require_forward(ctx: ExplainContext, method: str) -> NumpyForward:
    """The context's ONNX forward; perturbation methods never fall back to ``ctx.model``."""
    if ctx.forward_numpy is None:
        raise UnsupportedMethodError(
            f"method {method!r} runs on the ONNX Runtime forward, and this model has none"
        )
    return ctx.forward_numpy


def images_numpy(inputs: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` float32 C-contiguous numpy copy-free where possible."""
    if inputs.ndim != 4:
        raise InvalidInputError(f"expected images (B, C, H, W), got shape {tuple(inputs.shape)}")
    return np.ascontiguousarray(inputs.detach().to("cpu", torch.float32).numpy())


def targets_numpy(targets: torch.Tensor, batch: int) -> np.ndarray:
    """``(B,)`` int64 target classes; one target per image."""
    out = targets.detach().to("cpu").reshape(-1).numpy().astype(np.int64)
    if out.shape[0] != batch:
        raise InvalidInputError(f"expected {batch} targets, got {out.shape[0]}")
    return out


def check_targets(targets: np.ndarray, num_classes: int) -> None:
    """Raise ``TargetOutOfRangeError`` unless every target indexes the logits."""
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.size:
        raise TargetOutOfRangeError(
            f"target class {int(bad[0])} is outside [0, {num_classes}) for this model"
        )


def chunks(total: int, chunk_size: int, check: Check | None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks, checking the deadline before each one.

    Checking *before* a chunk means a passed deadline stops the work without starting
    another forward, and the caller raises before writing any result.
    """
    if chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, total, chunk_size):
        if check is not None:
            check()
        yield start, min(start + chunk_size, total)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable probabilities near 0 and 1."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def pick(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``values[i, targets[i]]`` for every row."""
    return values[np.arange(values.shape[0]), targets]


def seed_from(generator: torch.Generator) -> int:
    """A 63-bit seed drawn from the request's generator (its only source of randomness)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def gaussian_blur(images: np.ndarray, ksize: int = 11, sigma: float = 5.0) -> np.ndarray:
    """Blurred copy of ``(B, C, H, W)`` images; RISE's insertion substrate (klen 11, sigma 5)."""
    out = np.empty_like(images)
    for b in range(images.shape[0]):
        # cv2 blurs (H, W, C) images channel by channel in one call.
        hwc = np.ascontiguousarray(images[b].transpose(1, 2, 0))
        blurred = cv2.GaussianBlur(hwc, (ksize, ksize), sigma, borderType=cv2.BORDER_REFLECT)
        out[b] = blurred.reshape(hwc.shape).transpose(2, 0, 1)
    return out


def param(
    params: Mapping[str, object],
    defaults: Mapping[str, ParamValue],
    name: str,
) -> ParamValue:
    """``params[name]`` (already coerced by the registry) or the registered default."""
    value = params.get(name, defaults[name])
    if not isinstance(value, bool | int | float | str):
        raise InvalidInputError(f"parameter {name!r} has an unsupported type {type(value)}")
    return value


def int_param(params: Mapping[str, object], defaults: Mapping[str, ParamValue], name: str) -> int:
    value = param(params, defaults, name)
    if isinstance(value, str) or (isinstance(value, float) and not value.is_integer()):
        raise InvalidInputError(f"parameter {name!r} must be an integer, got {value!r}")
    return int(value)


def float_param(
    params: Mapping[str, object], defaults: Mapping[str, ParamValue], name: str
) -> float:
    value = param(params, defaults, name)
    if isinstance(value, str):
        raise InvalidInputError(f"parameter {name!r} must be a number, got {value!r}")
    return float(value)


def str_param(params: Mapping[str, object], defaults: Mapping[str, ParamValue], name: str) -> str:
    return str(param(params, defaults, name))


def positive(name: str, value: int) -> int:
    if value < 1:
        raise InvalidInputError(f"parameter {name!r} must be >= 1, got {value}")
    return value
