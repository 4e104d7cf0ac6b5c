"""Timing side by side: blocks of back-to-back calls, interleaved repeat by repeat."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from bench.speed.cases import CaseResult

PAUSE = 0.05  # seconds between timed calls
# A timed figure is the mean call time over a block of back-to-back calls lasting at least
# this long (one call for anything slower). A lone call of a few milliseconds, right after
# a different workload and a pause, pays for cold caches and sleeping threads: on the
# default model (6 ms forwards) that alone moved single-call ratios by 10-20% from repeat
# to repeat, for the plain forward and the gradient alike.
MIN_BLOCK = 0.05


def timed(fn: Callable[[], object], min_seconds: float = MIN_BLOCK) -> float:
    """Seconds per call, over back-to-back calls lasting at least ``min_seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def interleave(
    result: CaseResult,
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warm: Sequence[str] | None = None,
) -> None:
    """Run ``fns`` in turn ``repeats`` times after one warm-up call each, recording times.

    Each timed call starts after a short pause: ONNX Runtime's pool threads spin for a
    while after a run, and would otherwise slow whatever torch measurement comes next.
    ``warm`` limits the warm-up to the named functions (the others ran already).
    """
    for name, fn in fns.items():
        if warm is None or name in warm:
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(PAUSE)
            result.times.setdefault(name, []).append(timed(fn))


def best_captum_rows(
    name: str, make: Callable[[int], Callable[[], object]], rows: Sequence[int], result: CaseResult
) -> int:
    """Captum's fastest batch setting on this run (each: one warm-up, then one timed call)."""
    seconds: dict[int, float] = {}
    for n_rows in rows:
        fn = make(n_rows)
        fn()
        time.sleep(PAUSE)
        seconds[n_rows] = timed(fn)
    result.captum_search[name] = seconds
    return min(seconds, key=lambda r: seconds[r])
