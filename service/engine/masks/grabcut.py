"""GrabCut seeded from saliency (Simonyan et al. 2013, sec. 3.1).

Pixels at or above the ``foreground_quantile`` of the map are sure foreground, those at or
below the ``background_quantile`` sure background; the rest start as probable foreground
above the median and probable background below it. GrabCut fits colour models to the
seeds and labels the uncertain pixels. A constant map gives an empty mask; when GrabCut
cannot fit its models (too few seeds of a kind) the seeds' own labelling is returned.
"""

from __future__ import annotations

import cv2
import numpy as np

from service.engine.masks.base import check_map
from service.engine.registry import InputShape, Param, ResolvedParams, register_mask
from service.protocol.errors import InvalidInputError

SIMONYAN_2013 = "https://arxiv.org/abs/1312.6034"
FOREGROUND_QUANTILE = 0.95
BACKGROUND_QUANTILE = 0.30
ITERATIONS = 5
RNG_SEED = 0
# The names of the two quantiles are those of MaskOptions' fields, which old clients set.
PARAMS = (
    Param(
        "foreground_quantile",
        "float",
        FOREGROUND_QUANTILE,
        "quantile of the map at or above which pixels are sure foreground",
        minimum=0.0,
        maximum=1.0,
        minimum_exclusive=True,
    ),
    Param(
        "background_quantile",
        "float",
        BACKGROUND_QUANTILE,
        "quantile of the map at or below which pixels are sure background",
        minimum=0.0,
        maximum=1.0,
        maximum_exclusive=True,
    ),
    # Each iteration refits the colour models: the bound keeps a request's cost small.
    Param("iterations", "int", ITERATIONS, "GrabCut iterations", minimum=1, maximum=20),
)


def _validate(params: ResolvedParams, input_shape: InputShape | None) -> None:
    foreground = float(params["foreground_quantile"])
    background = float(params["background_quantile"])
    if not background < foreground:
        raise InvalidInputError(
            f"mask quantiles need background ({background}) < foreground ({foreground})"
        )


def grabcut_mask(
    image: np.ndarray,
    saliency: np.ndarray,
    fg_quantile: float = FOREGROUND_QUANTILE,
    bg_quantile: float = BACKGROUND_QUANTILE,
    iterations: int = ITERATIONS,
) -> np.ndarray:
    """Object mask by GrabCut seeded from saliency (Simonyan et al. 2013, sec. 3.1).

    Pixels at or above the ``fg_quantile`` of the map are sure foreground, those at or
    below the ``bg_quantile`` sure background; the rest start as probable foreground when
    above the median and probable background otherwise. GrabCut then fits colour models
    to the seeds and labels the uncertain pixels.

    Args:
        image: uint8 ``(H, W, 3)`` (RGB or BGR: GrabCut only models colours).
        saliency: ``(H, W)`` map.
        fg_quantile: quantile above which pixels are sure foreground.
        bg_quantile: quantile below which pixels are sure background.
        iterations: GrabCut iterations.

    Returns:
        bool ``(H, W)`` foreground; empty when the map is constant (no seeds of one kind).
        If GrabCut cannot fit its colour models (too few seeds of a kind), the seeds'
        own labelling is returned.

    Paper: https://arxiv.org/abs/1312.6034
    """
    values = check_map(saliency)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape != (*values.shape, 3):
        raise InvalidInputError(
            f"image must be uint8 {(*values.shape, 3)} to match the map, "
            f"got {image.dtype} {image.shape}"
        )
    if not 0.0 <= bg_quantile < fg_quantile <= 1.0:
        raise InvalidInputError(
            f"need 0 <= bg_quantile < fg_quantile <= 1, got {bg_quantile}, {fg_quantile}"
        )
    if iterations < 1:
        raise InvalidInputError(f"iterations must be at least 1, got {iterations}")
    high, low, median = np.quantile(values, [fg_quantile, bg_quantile, 0.5])
    sure_fg = (values >= high) & (values > low)  # strict on `low`: ties stay background
    sure_bg = (values <= low) & ~sure_fg
    if not sure_fg.any() or not sure_bg.any():
        return np.zeros(values.shape, dtype=bool)
    labels = np.where(values > median, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    labels[sure_fg] = cv2.GC_FGD
    labels[sure_bg] = cv2.GC_BGD
    seeded = labels.copy()
    bgd_model = np.zeros((1, 65), np.float64)
    fgd_model = np.zeros((1, 65), np.float64)
    # GrabCut initialises its colour models with k-means, which draws from OpenCV's RNG:
    # seed it (per thread in OpenCV) so that the same map always gives the same mask.
    cv2.setRNGSeed(RNG_SEED)
    try:
        cv2.grabCut(
            np.ascontiguousarray(image),
            labels,
            (0, 0, 0, 0),  # rect: ignored with GC_INIT_WITH_MASK
            bgd_model,
            fgd_model,
            iterations,
            cv2.GC_INIT_WITH_MASK,
        )
    except cv2.error:
        labels = seeded  # e.g. fewer seed pixels than Gaussian components
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


@register_mask(
    "grabcut",
    params=PARAMS,
    validate=_validate,
    description="GrabCut seeded from the map's quantiles (Simonyan et al. 2013, sec. 3.1)",
    paper=SIMONYAN_2013,
)
def grabcut(
    image: np.ndarray,
    saliency: np.ndarray,
    *,
    foreground_quantile: float,
    background_quantile: float,
    iterations: int,
) -> np.ndarray:
    """:func:`grabcut_mask` with the registered parameters."""
    return grabcut_mask(image, saliency, foreground_quantile, background_quantile, iterations)
