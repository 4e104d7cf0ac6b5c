"""Data passed into and out of every explanation method."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from service.engine.attention_info import AttentionInfo
from service.engine.cam_layer import CamLayer
from service.protocol.errors import CancelledError, DeadlineExceededError

NumpyForward = Callable[[np.ndarray], np.ndarray]
"""Forward-only model: float32 ``(N, C, H, W)`` pixels in ``[0, 1]`` -> ``(N, classes)`` logits."""


@dataclass(frozen=True)
class Progress:
    """A slow method's maps so far (an anytime map), before its result.

    Attributes:
        maps: float32 ``(B, H, W)``, the current estimate of every image of the batch, in
            the units of the final maps.
        forwards: model rows the call has spent so far, for the whole batch.
    """

    maps: torch.Tensor
    forwards: int


ProgressFn = Callable[[Progress], None]
"""Receives a call's :class:`Progress`; called from the thread that runs the method."""


@dataclass
class ExplainContext:
    """Everything a method may use besides the inputs and targets.

    Attributes:
        model: differentiable module in pixel space (inputs in ``[0, 1]``, normalisation
            inside), eval mode, parameters frozen. ``None`` on a forward-only host.
        forward_numpy: fast forward (ONNX Runtime) for forward-only methods and scores.
        target_layer: the module CAM methods hook, or ``None``.
        cam_layer: what that module outputs (a spatial map, or tokens to reshape); ``None``
            reads the output as a spatial map.
        attention: the model's self-attention, for the transformer-native methods.
        generator: seeded per request; the only source of randomness a method may use.
        deadline: ``time.monotonic()`` value after which work must stop, or ``None``.
        cancelled: returns True once the caller has gone away, or ``None``.
        chunk_size: how many perturbed samples go through the model in one pass.
        progress: receives anytime maps of the slow forward-only methods, or ``None``.
            Per call, never global: an engine serves concurrent batches, each with its
            own context (see :meth:`report_progress` for the rate).
        progress_interval: least seconds between two reports (the first always goes).
    """

    model: torch.nn.Module | None
    forward_numpy: NumpyForward | None = None
    target_layer: torch.nn.Module | None = None
    cam_layer: CamLayer | None = None
    attention: AttentionInfo | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    deadline: float | None = None
    cancelled: Callable[[], bool] | None = None
    chunk_size: int = 32
    progress: ProgressFn | None = None
    progress_interval: float = 0.2
    _last_report: float | None = field(default=None, repr=False)

    @property
    def wants_progress(self) -> bool:
        """Whether a report now would be sent: methods build a map only then."""
        if self.progress is None:
            return False
        last = self._last_report
        return last is None or time.monotonic() - last >= self.progress_interval

    def report_progress(self, maps: Callable[[], np.ndarray], forwards: int) -> None:
        """Send the maps so far, at most one report per ``progress_interval`` seconds.

        Args:
            maps: builds the float32 ``(B, H, W)`` maps; called only when a report goes.
            forwards: rows spent so far by the call.
        """
        if not self.wants_progress:
            return
        assert self.progress is not None
        self._last_report = time.monotonic()
        current = torch.from_numpy(np.ascontiguousarray(maps(), dtype=np.float32))
        self.progress(Progress(maps=current, forwards=forwards))

    def check_deadline(self) -> None:
        """Raise once the deadline has passed or the caller cancelled; call between chunks."""
        if self.cancelled is not None and self.cancelled():
            raise CancelledError("the request was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceededError("deadline exceeded while computing the explanation")


@dataclass
class Attribution:
    """A method's result over a batch.

    Attributes:
        maps: float32 ``(B, H, W)`` at input resolution; larger means more important.
        completeness_error: ``(B,)`` where the method defines one (Integrated Gradients):
            ``|sum(attr) - (f(x) - f(baseline))|`` for the target logit.
    """

    maps: torch.Tensor
    completeness_error: torch.Tensor | None = None


MethodFn = Callable[..., Attribution]
"""``fn(ctx, inputs, targets, *, <params>) -> Attribution``.

Each method takes its registered parameters as typed keyword-only arguments without
defaults (``n_steps: int``); the registry checks that at registration. Typed loosely on
purpose: a ``Protocol`` cannot spell "some keyword arguments" for every method at once.
"""
