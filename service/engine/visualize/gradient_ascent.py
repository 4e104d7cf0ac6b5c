"""Class model visualisation by gradient ascent on the input (Simonyan et al. 2013, sec. 2).

The image ``I`` maximises ``S_c(I) - lambda * ||I||^2``, where ``S_c`` is the class's
pre-softmax score and ``I`` is taken relative to the mean image, as in the paper. Here
``I`` lives in the model's normalised space, ``z = (pixels - mean) / std``, so that zero
is the mean image and the penalty weighs every channel as the network sees it.

Gradient ascent with a normalised step, ``z <- z + lr * grad / rms(grad)``, from the mean
image (the paper's start) or from seeded noise around it. The normalised step has the
paper's fixed points (where the objective's gradient vanishes) but a known length: from
the mean image the class gradient is tiny, and plain steps stalled on 5 of the default
model's 10 classes. One addition to the paper, stated because it changes the
result: after each step the pixels are clipped to ``[0, 1]``, the only images the model
accepts. An optional jitter (a random roll of up to ``jitter`` pixels before each
gradient, off by default) is the common trick against high-frequency patterns.
"""

from __future__ import annotations

import math

import torch

from service.engine.registry import InputShape, Param, ResolvedParams
from service.engine.visualize.base import Visualization, VisualizeRun, register_visualizer
from service.protocol.cost import Cost

SIMONYAN_2013 = "https://arxiv.org/abs/1312.6034"
START_NOISE = 0.1
"""Standard deviation, in normalised units, of the ``random`` start around the mean image."""


def one_row_per_step(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """One gradient row per step; the image, its gradient and bounds in memory."""
    return Cost(backward_rows=int(params["steps"]), memory_bytes=16 * math.prod(input_shape))


@register_visualizer(
    "gradient_ascent",
    description=(
        "Gradient ascent on the input of the class score with an L2 penalty, from the mean "
        "image (Simonyan et al. 2013, Deep Inside Convolutional Networks, sec. 2)"
    ),
    paper=SIMONYAN_2013,
    cost=one_row_per_step,
    params=(
        Param("steps", "int", 200, "gradient ascent iterations", minimum=1, maximum=4096),
        Param(
            "learning_rate",
            "float",
            0.1,
            "RMS step size on the normalised image",
            minimum=0,
            minimum_exclusive=True,
            maximum=1000,
        ),
        Param(
            "l2",
            "float",
            0.001,
            "lambda of the L2 penalty on the normalised image",
            minimum=0,
            maximum=100,
        ),
        Param(
            "start",
            "str",
            "mean",
            "mean image, or seeded noise around it",
            choices=("mean", "random"),
        ),
        Param("jitter", "int", 0, "largest random roll in pixels per step", minimum=0, maximum=64),
    ),
)
def gradient_ascent(
    run: VisualizeRun, *, steps: int, learning_rate: float, l2: float, start: str, jitter: int
) -> Visualization:
    """The image of ``run.target`` that gradient ascent reaches.

    Args:
        run: model, target, seeded generator, deadline (see :class:`VisualizeRun`).
        steps: iterations.
        learning_rate: ``lr`` of ``z <- z + lr * g / rms(g)``, ``g = d(S_c - l2 ||z||^2)/dz``.
        l2: the penalty's ``lambda``.
        start: ``"mean"`` (zero) or ``"random"`` (seeded Gaussian noise around it).
        jitter: largest random roll, in pixels, applied before each gradient (0: none).

    Returns:
        The image in ``[0, 1]`` and its final class logit; no transparency map.
    """
    mean, std = run.channel_stats()
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    z = torch.zeros(run.input_shape)
    if start == "random":
        z = START_NOISE * torch.randn(run.input_shape, generator=run.ctx.generator)
    z = torch.maximum(torch.minimum(z, high), low)
    score = 0.0
    for step in range(1, steps + 1):
        shift = _roll(run, jitter)
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            pixels = torch.roll(leaf * std + mean, shift, dims=(1, 2))
            logit = run.model(pixels.unsqueeze(0))[0, run.target]
            objective = logit - l2 * leaf.pow(2).sum()
            (grad,) = torch.autograd.grad(objective, leaf)
        score = float(logit.detach())
        # Normalised step: the same fixed points as plain ascent (where the gradient of the
        # objective vanishes), but steps of a known size whatever the model's gradient
        # scale: from the mean image the class gradient is tiny and plain steps stall.
        step_size = learning_rate / (grad.pow(2).mean().sqrt() + 1e-12)
        z = torch.maximum(torch.minimum(z + step_size * grad, high), low)
        run.step(step, steps, score, lambda z=z: z * std + mean)  # type: ignore[misc]
    image = (z * std + mean).clamp(0.0, 1.0)
    with torch.no_grad():
        score = float(run.model(image.unsqueeze(0))[0, run.target])
    return Visualization(image=image, transparency=None, score=score)


def _roll(run: VisualizeRun, jitter: int) -> tuple[int, int]:
    if jitter == 0:
        return (0, 0)
    offsets = torch.randint(-jitter, jitter + 1, (2,), generator=run.ctx.generator)
    return (int(offsets[0]), int(offsets[1]))
