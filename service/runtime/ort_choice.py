"""ONNX Runtime settings per model, chosen by measurement when the model is loaded.

The forward-only methods (occlusion, RISE, Sobol, LIME, KernelSHAP) spend their time in
``session.run`` over chunks of perturbed images, so what one row costs there is what a
request costs. Which session options and how many rows per run are fastest depends on the
model (a depthwise CNN and a ViT differ) and on the machine, so, as the channels-last
choice in :mod:`service.runtime.optimize` is made, each candidate is timed on the loaded
model and the fastest kept:

1. session options: the graph optimisation level, sequential or parallel execution of
   graph branches, and intra-op threads (all usable cores, or half), timed on one chunk;
2. rows per ``session.run`` (the forward chunk), timed with the options chosen in 1.

A candidate replaces the default only when it is more than :data:`MARGIN` faster per
row (a tie is noise, and the default is the known quantity). Choosing stops starting new
candidates once :data:`BUDGET_S` seconds are spent, so a large model's load stays bounded.
``SALIENCY_ORT_SETTINGS`` (e.g. ``"threads=2,optimization=all,parallel=0,chunk=32"``) pins
the settings and skips the measuring; keys left out keep their defaults.

IO binding is not a candidate: on the CPU provider ``session.run`` already reads the
numpy input in place and the output is one small ``(N, K)`` array, so binding had
nothing to save (see ``bench/results/speed.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from service.runtime.onnx_forward import OPTIMIZATION_LEVELS, OnnxForward

logger = logging.getLogger(__name__)

ENV = "SALIENCY_ORT_SETTINGS"
CHUNK_CANDIDATES = (8, 16, 32, 64)
SESSION_ROWS = 16  # rows per timed run while the session options are compared
ROUNDS = 3  # each candidate's time is the least of this many, taken in turn with the others
MARGIN = 0.03  # a candidate must be this much faster per row than the default to win
BUDGET_S = 10.0  # no new candidate is started after this many seconds of choosing
T = TypeVar("T")


@dataclass(frozen=True)
class OrtSettings:
    """What :class:`OnnxForward` is built with, and rows per run for the forward methods."""

    threads: int
    optimization: str = "all"
    parallel: bool = False
    chunk: int = 32

    def pin(self) -> str:
        """These settings as a ``SALIENCY_ORT_SETTINGS`` value (:meth:`parse` reads it)."""
        return (
            f"threads={self.threads},optimization={self.optimization},"
            f"parallel={int(self.parallel)},chunk={self.chunk}"
        )

    def label(self) -> str:
        mode = "parallel" if self.parallel else "sequential"
        return f"{self.threads} threads, optimization {self.optimization}, {mode}"

    def forward(self, path: Path, providers: Sequence[str] | None = None) -> OnnxForward:
        """An :class:`OnnxForward` of ``path`` with these session options."""
        return OnnxForward(
            path,
            providers=providers,
            intra_op_threads=self.threads,
            optimization=self.optimization,
            parallel=self.parallel,
            max_batch=max(64, self.chunk),
        )

    @classmethod
    def parse(cls, text: str, default: OrtSettings) -> OrtSettings:
        """``"threads=2,optimization=all,parallel=0,chunk=32"`` over ``default``.

        Raises:
            ValueError: an unknown key or a value out of range, naming what is accepted.
        """
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if key in ("threads", "chunk"):
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"{ENV}: {key} must be a positive integer, got {value!r}")
                values[key] = int(value)
            elif key == "optimization":
                if value not in OPTIMIZATION_LEVELS:
                    raise ValueError(
                        f"{ENV}: optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, "
                        f"got {value!r}"
                    )
                values[key] = value
            elif key == "parallel":
                if value not in ("0", "1"):
                    raise ValueError(f"{ENV}: parallel must be 0 or 1, got {value!r}")
                values[key] = value == "1"
            else:
                raise ValueError(
                    f"{ENV}: unknown key {key!r} (threads, optimization, parallel, chunk)"
                )
        return dataclasses.replace(default, **values)  # type: ignore[arg-type]


@dataclass
class OrtChoice:
    """The settings kept, what each candidate measured (seconds per row) and why."""

    settings: OrtSettings
    session_times: dict[str, float] = field(default_factory=dict)
    chunk_times: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    pinned: bool = False
    shared_from: str = ""  # the record another worker of this model wrote, when read

    def reason(self) -> str:
        """One line for the log: the choice and the timings it was made on."""
        if self.shared_from:
            return (
                f"{self.settings.label()}, chunk {self.settings.chunk}, as measured by this "
                f"model's first worker ({self.shared_from})"
            )
        if self.pinned:
            return f"pinned by {ENV}: {self.settings.label()}, chunk {self.settings.chunk}"
        sessions = "; ".join(f"{k}: {v * 1e3:.2f} ms/row" for k, v in self.session_times.items())
        chunks = ", ".join(f"{k}: {v * 1e3:.2f}" for k, v in self.chunk_times.items())
        return (
            f"{self.settings.label()}, chunk {self.settings.chunk} (chosen in "
            f"{self.seconds:.1f} s; options at {SESSION_ROWS} rows: {sessions}; "
            f"ms/row by chunk: {chunks})"
        )


Measure = Callable[[OrtSettings, int], float]
"""``measure(settings, rows)``: seconds of one forward of ``rows`` rows with ``settings``."""


def fastest(
    candidates: Sequence[T],
    cost: Callable[[T], float],
    *,
    budget_s: float,
    clock: Callable[[], float],
    started: float,
) -> tuple[T, dict[T, float]]:
    """The candidate of least ``cost``; ``candidates[0]`` (the default) unless another is
    more than :data:`MARGIN` cheaper.

    Candidates are timed in turn, :data:`ROUNDS` times, and each keeps its least cost: the
    load of the moment then falls on all of them alike (on the loaded development machine
    the same settings measured 7 and 22 ms per row a few seconds apart). Nothing
    new starts once ``budget_s`` is spent.
    """
    costs: dict[T, float] = {}
    for _ in range(ROUNDS):
        for candidate in candidates:
            if costs and clock() - started > budget_s:
                return _pick(candidates, costs), costs
            costs[candidate] = min(costs.get(candidate, math.inf), cost(candidate))
    return _pick(candidates, costs), costs


def _pick(candidates: Sequence[T], costs: dict[T, float]) -> T:
    best = min(costs, key=lambda c: costs[c])
    return best if costs[best] < (1 - MARGIN) * costs[candidates[0]] else candidates[0]


def session_candidates(default: OrtSettings) -> list[OrtSettings]:
    """The default first, then one change at a time."""
    out = [
        default,
        dataclasses.replace(default, optimization="extended"),
        dataclasses.replace(default, parallel=True),
    ]
    if default.threads > 1:
        out.append(dataclasses.replace(default, threads=default.threads // 2))
    return out


def choose_ort_settings(
    default: OrtSettings,
    measure: Measure,
    *,
    pinned: str | None = None,
    chunks: Sequence[int] = CHUNK_CANDIDATES,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> OrtChoice:
    """Settings of least time per row on this model and machine, or the pinned ones.

    Args:
        default: today's settings; kept unless a candidate measures faster.
        measure: times one forward (:func:`session_timer` on a real model).
        pinned: a ``SALIENCY_ORT_SETTINGS`` value; when set nothing is measured.
        chunks: rows per run to try, the default's own included.
        budget_s: no candidate starts after this many seconds.
        clock: seconds, for the budget (tests pass a fake one).

    Returns:
        The :class:`OrtChoice`, with every measured candidate's seconds per row.
    """
    if pinned:
        return OrtChoice(OrtSettings.parse(pinned, default), pinned=True)
    started = clock()
    options, session_costs = fastest(
        session_candidates(default),
        lambda s: measure(s, SESSION_ROWS) / SESSION_ROWS,
        budget_s=budget_s,
        clock=clock,
        started=started,
    )
    ordered = [default.chunk, *(c for c in chunks if c != default.chunk)]
    chunk, chunk_costs = fastest(
        ordered,
        lambda rows: measure(dataclasses.replace(options, chunk=rows), rows) / rows,
        budget_s=budget_s,
        clock=clock,
        started=started,
    )
    return OrtChoice(
        dataclasses.replace(options, chunk=chunk),
        session_times={s.label(): t for s, t in session_costs.items()},
        chunk_times=dict(sorted(chunk_costs.items())),
        seconds=clock() - started,
    )


def session_timer(path: Path, input_shape: Sequence[int]) -> Measure:
    """A :data:`Measure` on the model at ``path``: one session per option set (cached), a
    warm-up run the first time a session sees a batch size, then one timed run per call
    (:func:`fastest` keeps the least of its rounds)."""
    sessions: dict[tuple[int, str, bool], OnnxForward] = {}
    batches: dict[int, np.ndarray] = {}
    warmed: set[tuple[tuple[int, str, bool], int]] = set()
    rng = np.random.default_rng(5)

    def measure(settings: OrtSettings, rows: int) -> float:
        key = (settings.threads, settings.optimization, settings.parallel)
        if key not in sessions:
            sessions[key] = settings.forward(path, ["CPUExecutionProvider"])
        forward = sessions[key]
        if rows not in batches:
            batches[rows] = rng.random((rows, *input_shape), dtype=np.float32)
        if (key, rows) not in warmed:
            forward(batches[rows])
            warmed.add((key, rows))
        start = time.perf_counter()
        forward(batches[rows])
        return time.perf_counter() - start

    return measure
