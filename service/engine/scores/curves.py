"""Deletion and insertion AUC (Petsiuk et al. 2018, RISE), sharing one pass when both are asked.

Pixels are removed from the image (deletion) or added to a substrate (insertion) in order
of decreasing saliency, ``steps`` equal fractions at a time; the score is the area under
the target class softmax probability against the fraction of pixels changed (trapezoid
rule on ``[0, 1]``, so it lies in ``[0, 1]``). A faithful map gives a *low* deletion AUC
and a *high* insertion AUC. Costs ``N * (steps + 1)`` forwards per curve.
"""

from __future__ import annotations

import numpy as np
import torch

from service.engine import perturb
from service.engine.ops import gaussian_blur, softmax
from service.engine.registry import InputShape, Param, ResolvedParams, register_score
from service.engine.scores.base import ScoreContext, check_inputs
from service.engine.types import NumpyForward
from service.protocol.cost import Cost
from service.protocol.errors import InvalidInputError

PETSIUK_2018 = "https://arxiv.org/abs/1806.07421"
SUBSTRATES = ("zero", "blur", "mean")
DEFAULT_STEPS = 32
DELETION_SUBSTRATE = "zero"  # RISE: removed pixels become black
INSERTION_SUBSTRATE = "blur"  # RISE: pixels are inserted into a blurred copy
STEPS = Param(
    "steps",
    "int",
    DEFAULT_STEPS,
    "the curve has steps + 1 points, at fractions 0, 1/steps, ..., 1 of the pixels",
    minimum=1,
    maximum=1024,
)
SUBSTRATE_DOC = "zero (black), blur (Gaussian, 11 taps, sigma 5) or mean (per channel)"
CURVES = {"deletion_auc": "deletion", "insertion_auc": "insertion"}


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """``steps + 1`` forwards per map (a curve shares the pass of the other, not its rows);
    the pixel ranks (int64, twice) and the image with both substrates."""
    channels, height, width = input_shape
    memory = 16 * height * width + 3 * 4 * channels * height * width
    return Cost(forwards=int(params["steps"]) + 1, memory_bytes=memory)


def make_substrate(images: np.ndarray, kind: str) -> np.ndarray:
    """What changed pixels become (deletion) or start as (insertion), ``(N, C, H, W)``."""
    if kind == "zero":
        return np.zeros_like(images)
    if kind == "blur":  # RISE's insertion substrate: 11-tap kernel, sigma 5
        blurred = gaussian_blur(torch.from_numpy(images), 5.0, radius=5, border="symmetric")
        return blurred.numpy()
    if kind == "mean":
        return np.broadcast_to(images.mean(axis=(2, 3), keepdims=True), images.shape).copy()
    raise InvalidInputError(f"substrate must be one of {SUBSTRATES}, got {kind!r}")


def curve_aucs(
    forward: NumpyForward,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    curves: dict[str, str],
    *,
    steps: int,
    chunk_size: int,
    check: perturb.Check | None,
) -> dict[str, np.ndarray]:
    """AUC of each curve (``"deletion"``/``"insertion"`` -> substrate) in one pass."""
    images, maps, targets = check_inputs(images, maps, targets)
    n, _, h, w = images.shape
    pixels = h * w
    # rank[b, p] = position of pixel p in decreasing saliency; a pixel is changed at step k
    # when its rank is below cut[k].
    order = np.argsort(-maps.reshape(n, pixels), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(pixels), order.shape), axis=1)
    cut = np.rint(np.linspace(0, pixels, steps + 1)).astype(np.int64)
    # sources[0] is the image, then one substrate per curve. Where a pixel is changed the
    # sample takes `changed_src`, elsewhere `kept_src`: deletion swaps the image for its
    # substrate, insertion swaps the substrate for the image.
    names = list(curves)
    sources = np.stack([images] + [make_substrate(images, curves[name]) for name in names])
    changed_src = np.array([i + 1 if name == "deletion" else 0 for i, name in enumerate(names)])
    kept_src = np.array([0 if name == "deletion" else i + 1 for i, name in enumerate(names)])

    per_image = len(names) * (steps + 1)

    def build(start: int, stop: int, out: np.ndarray) -> None:
        item, rest = np.divmod(np.arange(start, stop), per_image)
        curve, k = np.divmod(rest, steps + 1)
        changed = (rank[item] < cut[k, None]).reshape(-1, 1, h, w)
        out[...] = np.where(
            changed, sources[changed_src[curve], item], sources[kept_src[curve], item]
        )

    prob = np.empty(n * per_image, dtype=np.float64)
    for start, stop, _, logits in perturb.pipelined(
        forward, n * per_image, chunk_size, images.shape[1:], build, check
    ):
        item = np.arange(start, stop) // per_image
        prob[start:stop] = perturb.pick(softmax(logits), targets[item])
    y = prob.reshape(n, len(names), steps + 1)
    x = cut / pixels
    auc = np.clip(np.sum((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2.0, axis=-1), 0.0, 1.0)
    return {name: auc[:, i] for i, name in enumerate(names)}


def deletion_insertion_auc(
    forward: NumpyForward,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    *,
    steps: int = DEFAULT_STEPS,
    deletion_substrate: str = DELETION_SUBSTRATE,
    insertion_substrate: str = INSERTION_SUBSTRATE,
    chunk_size: int = 32,
    check: perturb.Check | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC of the target probability, as defined by RISE.

    Args:
        forward: ``(N, C, H, W) -> (N, K)`` logits.
        images: float32 ``(N, C, H, W)`` pixels in ``[0, 1]``.
        maps: ``(N, H, W)`` saliency, larger = more important; ties keep raster order.
        targets: ``(N,)`` class per image.
        steps: each curve has ``steps + 1`` points, at fractions ``0, 1/steps, ..., 1``.
        deletion_substrate: what removed pixels become (see :func:`make_substrate`).
        insertion_substrate: the image pixels are inserted into; RISE uses ``"blur"``.
        chunk_size: perturbed images per forward.
        check: called before every forward; raises to stop (deadline).

    Returns:
        ``(deletion_auc, insertion_auc)``, each float64 ``(N,)`` in ``[0, 1]``.
    """
    curves = {"deletion": deletion_substrate, "insertion": insertion_substrate}
    aucs = curve_aucs(
        forward, images, maps, targets, curves, steps=steps, chunk_size=chunk_size, check=check
    )
    return aucs["deletion"], aucs["insertion"]


def _shared_pass(
    ctx: ScoreContext, images: np.ndarray, maps: np.ndarray, targets: np.ndarray, name: str
) -> np.ndarray:
    """``name``'s AUC from one pass over every requested curve with the same ``steps``."""
    steps = ctx.requested[name]["steps"]
    curves = {
        CURVES[score]: str(params["substrate"])
        for score, params in ctx.requested.items()
        if score in CURVES and params["steps"] == steps
    }
    key = ("curves", steps, tuple(curves.items()))
    if key not in ctx.memo:
        ctx.memo[key] = curve_aucs(
            ctx.forward,
            images,
            maps,
            targets,
            curves,
            steps=int(steps),
            chunk_size=ctx.chunk_size,
            check=ctx.check,
        )
    aucs: dict[str, np.ndarray] = ctx.memo[key]  # type: ignore[assignment]
    return aucs[CURVES[name]]


def _register_curve(name: str, substrate: str, higher_is_better: bool, description: str) -> None:
    """Register one curve's AUC: both curves are the same score with their own substrate."""

    def curve_auc(
        ctx: ScoreContext,
        images: np.ndarray,
        maps: np.ndarray,
        targets: np.ndarray,
        *,
        steps: int,
        substrate: str,
    ) -> np.ndarray:
        return _shared_pass(ctx, images, maps, targets, name)

    curve_auc.__name__ = curve_auc.__qualname__ = name
    curve_auc.__doc__ = f"{name} per image, float64 ``(N,)`` in ``[0, 1]``."
    register_score(
        name,
        params=(STEPS, Param("substrate", "str", substrate, SUBSTRATE_DOC, choices=SUBSTRATES)),
        higher_is_better=higher_is_better,
        description=description,
        paper=PETSIUK_2018,
        cost=cost,
    )(curve_auc)


_register_curve(
    "deletion_auc",
    DELETION_SUBSTRATE,
    higher_is_better=False,
    description="Area under the target probability as the most salient pixels are removed "
    "(Petsiuk et al. 2018, RISE)",
)
_register_curve(
    "insertion_auc",
    INSERTION_SUBSTRATE,
    higher_is_better=True,
    description="Area under the target probability as the most salient pixels are added to "
    "a blurred copy (Petsiuk et al. 2018, RISE)",
)
