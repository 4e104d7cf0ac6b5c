"""Shared plumbing of the forward-only (perturbation) methods and the faithfulness scores.

Every perturbation method has the same shape: build a chunk of perturbed inputs, run one
batched forward, fold the target scores into the map, check the deadline, repeat. What is
common lives here so that each method module only says how it perturbs and how it folds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from service.engine.targets import check_target_range
from service.engine.types import ExplainContext, NumpyForward
from service.protocol.errors import InvalidInputError, UnsupportedMethodError

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


def pick(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``values[i, targets[i]]`` for every row, after checking every target indexes a row."""
    check_target_range(targets, values.shape[1])
    return values[np.arange(values.shape[0]), targets]


def seed_from(generator: torch.Generator) -> int:
    """A 63-bit seed drawn from the request's generator (its only source of randomness)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of the same shape, in ``[-1, 1]``.

    Ranks break ties by position (``argsort`` is stable), which is exact for the
    continuous estimates compared here. Two constant maps agree (``1.0``): nothing is left
    to rank; one constant map against a varying one does not (``0.0``).
    """
    spread_a, spread_b = np.ptp(a), np.ptp(b)
    if spread_a == 0 or spread_b == 0:
        return 1.0 if spread_a == spread_b else 0.0
    ranks = []
    for values in (a.ravel(), b.ravel()):
        rank = np.empty(values.size, dtype=np.float64)
        rank[np.argsort(values, kind="stable")] = np.arange(values.size)
        ranks.append(rank)
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def doubling(floor: int, ceiling: int) -> list[int]:
    """Checkpoints ``floor, 2 floor, 4 floor, ..., ceiling`` (a floor above the ceiling is
    the ceiling): where a sampling method looks at its estimate and may stop."""
    points, n = [], max(1, min(floor, ceiling))
    while n < ceiling:
        points.append(n)
        n *= 2
    return [*points, ceiling]


def until_stable(
    checkpoints: Sequence[int],
    batch: int,
    tolerance: float,
    run: Callable[[int, int, np.ndarray], None],
    estimate: Callable[[int, int], np.ndarray],
    looked: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Sample checkpoint by checkpoint until each image's estimate stops changing rank.

    Samples ``lo..hi`` of the images still running go through ``run(lo, hi, images)``;
    after it, ``estimate(image, hi)`` is that image's estimate from its first ``hi``
    samples. An image stops once its estimate agrees with the one a checkpoint earlier to
    a Spearman correlation of at least ``1 - tolerance`` (``tolerance == 0``: never early,
    every image runs to the last checkpoint). Where the truth is flat (a background the
    model ignores) ranks stay noisy at any count: the correlation then plateaus below 1,
    and the ceiling, not the tolerance, ends the work. Each image's stop depends on its own
    estimates only, so a batch gives every image the map it gets alone.

    ``looked(used)``, when given, is called after every look but the last with the samples
    each image has used so far (an anytime map can be sent from there).

    Returns:
        ``(B,)`` int64: how many samples each image used.
    """
    used = np.zeros(batch, dtype=np.int64)
    active: np.ndarray = np.arange(batch)
    previous: dict[int, np.ndarray] = {}
    lo = 0
    for hi in checkpoints:
        if active.size == 0:
            break
        run(lo, hi, active)
        used[active] = hi
        running = []
        for item in active.tolist():
            current = estimate(item, hi)
            stable = (
                tolerance > 0
                and item in previous
                and rank_agreement(previous[item], current) >= 1.0 - tolerance
            )
            if not stable:
                previous[item] = current
                running.append(item)
        active = np.asarray(running, dtype=np.int64)
        lo = hi
        if looked is not None and active.size and hi != checkpoints[-1]:
            looked(used)
    return used
