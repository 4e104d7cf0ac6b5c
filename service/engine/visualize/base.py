"""The visualisation family: what a class-model visualiser is, and the registry of them.

A visualiser searches the input space for the image that maximises one class score of a
model (Simonyan et al. 2013, sec. 2). Members register with :func:`register_visualizer`
as methods, masks and scores do (:mod:`service.engine.registry`): the ``Visualization``
enum of the proto, the CLI choices and the docs are rendered from this registry.

A member is ``fn(run, *, <params>) -> Visualization``; it calls :meth:`VisualizeRun.step`
once per iteration, which checks the deadline and cancellation and reports progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from service.engine.registry import CostFn, Member, Param, Registry, Validator, check_signature
from service.engine.types import ExplainContext
from service.protocol.params import ParamSet

ProgressFn = Callable[["Progress"], None]


@dataclass(frozen=True)
class Progress:
    """One report during the search.

    Attributes:
        step: iterations done (1-based).
        steps: iterations in all.
        score: the class logit of the current image.
        image: float32 ``(C, H, W)`` in ``[0, 1]``, the current image, when asked for
            at this step (every ``VisualizeRun.image_every`` steps), else ``None``.
    """

    step: int
    steps: int
    score: float
    image: torch.Tensor | None


@dataclass
class VisualizeRun:
    """What a visualiser works with besides its parameters.

    Attributes:
        ctx: the differentiable model (pixel space, ``[0, 1]`` in), the seeded generator
            (the only source of randomness), the deadline and the cancellation check.
        target: the class whose logit is maximised.
        input_shape: ``(C, H, W)`` of the model's input.
        mean, std: the per-channel normalisation of the model's training data: the
            "mean image" a search starts from, and the space its L2 penalty is taken in.
        on_progress: called as the search goes, or ``None``.
        image_every: attach the current image to every this many steps' report (0: never).
    """

    ctx: ExplainContext
    target: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    on_progress: ProgressFn | None = None
    image_every: int = 0

    @property
    def model(self) -> torch.nn.Module:
        assert self.ctx.model is not None, "the serving layer checks the model first"
        return self.ctx.model

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as ``(C, 1, 1)`` float32 tensors."""
        shape = (len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        return mean, torch.tensor(self.std, dtype=torch.float32).view(shape)

    def step(self, step: int, steps: int, score: float, image: Callable[[], torch.Tensor]) -> None:
        """End of iteration ``step`` (1-based): stop if late or cancelled, report progress.

        ``image`` renders the current image; it is called only when a report carries one.
        """
        self.ctx.check_deadline()
        if self.on_progress is None:
            return
        due = self.image_every > 0 and (step % self.image_every == 0 or step == steps)
        self.on_progress(Progress(step, steps, score, image().detach() if due else None))


@dataclass(frozen=True)
class Visualization:
    """A visualiser's result.

    Attributes:
        image: float32 ``(C, H, W)`` in ``[0, 1]``.
        transparency: float32 ``(H, W)`` >= 0 where the method defines one (MACO: the
            accumulated input-gradient magnitude, how much each pixel mattered), else ``None``.
        score: the class logit of ``image`` at the end of the search.
    """

    image: torch.Tensor
    transparency: torch.Tensor | None
    score: float


@dataclass(frozen=True)
class VisualizerSpec(Member):
    """A class-model visualiser.

    Attributes:
        fn: ``fn(run, *, <params>) -> Visualization``.
        cost: ``cost(params, (C, H, W)) -> Cost``: iterations x gradient rows per iteration.
    """

    cost: CostFn


VISUALIZERS: Registry[VisualizerSpec] = Registry("visualisation method", "service.engine.visualize")
FnT = TypeVar("FnT", bound=Callable[..., Any])


def register_visualizer(
    name: str,
    *,
    description: str,
    paper: str,
    cost: CostFn,
    params: tuple[Param, ...] = (),
    validate: Validator | None = None,
) -> Callable[[FnT], FnT]:
    """Decorator that adds a visualiser under ``name``."""

    def decorate(fn: FnT) -> FnT:
        param_set = ParamSet(f"{VISUALIZERS.what} {name!r}", params)
        check_signature(fn, 1, param_set)
        VISUALIZERS.add(
            VisualizerSpec(
                name=name,
                fn=fn,
                params=param_set,
                description=description,
                paper=paper,
                validate=validate,
                cost=cost,
            )
        )
        return fn

    return decorate
