"""Shared plumbing of the forward-only (perturbation) methods and the faithfulness scores.

Every perturbation method has the same shape: build a chunk of perturbed inputs, run one
batched forward, fold the target scores into the map, check the deadline, repeat. What is
common lives here so that each method module only says how it perturbs and how it folds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

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
T = TypeVar("T")


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


def pipelined(
    forward: NumpyForward,
    total: int,
    chunk_size: int,
    sample_shape: tuple[int, ...],
    build: Callable[[int, int, np.ndarray], T],
    check: Check | None,
) -> Iterator[tuple[int, int, T, np.ndarray]]:
    """Forward chunk after chunk while a worker thread builds the next one.

    ``build(start, stop, out)`` writes samples ``start..stop`` into ``out`` and returns
    whatever the caller needs to fold the chunk's logits (its masks, say). Building costs
    a few percent of a forward; overlapping it with the forward (ONNX Runtime and numpy
    both release the GIL) keeps a method's time at its floor, the forwards alone. Two
    buffers alternate, so nothing is allocated per chunk and a chunk being forwarded is
    never written.

    Args:
        forward: the batched model.
        total: number of samples.
        chunk_size: samples per forward.
        sample_shape: ``(C, H, W)`` of one sample.
        build: fills one chunk; runs in the worker thread, one call at a time.
        check: called before every forward; its exception stops the work, and the
            generator waits for the build in flight before it propagates.

    Yields:
        ``(start, stop, build's result, logits)`` for consecutive chunks.
    """
    if chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be >= 1, got {chunk_size}")
    bounds = [(a, min(a + chunk_size, total)) for a in range(0, total, chunk_size)]
    if not bounds:
        return
    size = bounds[0][1] - bounds[0][0]
    buffers = [np.empty((size, *sample_shape), dtype=np.float32) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="perturb-build") as pool:

        def submit(k: int) -> Future[T]:
            start, stop = bounds[k]
            return pool.submit(build, start, stop, buffers[k % 2][: stop - start])

        pending = submit(0)
        for k, (start, stop) in enumerate(bounds):
            if check is not None:
                check()
            aux = pending.result()
            if k + 1 < len(bounds):
                pending = submit(k + 1)
            logits = forward(buffers[k % 2][: stop - start])
            yield start, stop, aux, logits


def masked_into(
    out: np.ndarray,
    images: np.ndarray,
    masks: np.ndarray,
    start: int,
    offset: np.ndarray | None = None,
) -> None:
    """Fill a chunk of mask-major samples: ``out[r] = offset[i] + images[i] * mask[m]``.

    Sample ``s = start + r`` pairs mask ``m = s // B`` with image ``i = s % B``. The rows
    of one image are then a strided slice of ``out`` whose masks are consecutive, so each
    image is multiplied straight into the buffer: one pass over memory, no gathered copy
    of images or masks.

    Args:
        out: ``(n, C, H, W)`` buffer to fill.
        images: ``(B, C, H, W)``.
        masks: ``(M, H, W)``: the masks ``start // B .. (start + n - 1) // B``.
        start: flat index of the chunk's first sample.
        offset: ``(B, C, H, W)`` added afterwards (a substrate), or ``None``.
    """
    batch, n = images.shape[0], out.shape[0]
    for r in range(min(batch, n)):
        item = (start + r) % batch
        rows = slice(r, None, batch)
        first = (start + r) // batch - start // batch
        count = len(range(r, n, batch))
        np.multiply(images[item], masks[first : first + count, None], out=out[rows])
        if offset is not None:
            out[rows] += offset[item]


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


def box_blur(image: np.ndarray, ksize: int = 10) -> np.ndarray:
    """``(C, H, W)`` image blurred by a ``ksize`` box, the authors' blurring substrate."""
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    return cv2.blur(hwc, (ksize, ksize)).reshape(hwc.shape).transpose(2, 0, 1)
