"""Masks and boxes from a saliency map (numpy + OpenCV), as in Simonyan et al. 2013, sec. 3.1.

All functions take a 2-D float map at image resolution, larger meaning more salient, and
never raise on a degenerate (constant) map: they return an empty mask or ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from service.engine.errors import InvalidInputError


@dataclass(frozen=True)
class Box:
    """Axis-aligned box, inclusive pixel coordinates (``x`` = column, ``y`` = row)."""

    x_min: int
    y_min: int
    x_max: int
    y_max: int

    @property
    def width(self) -> int:
        return self.x_max - self.x_min + 1

    @property
    def height(self) -> int:
        return self.y_max - self.y_min + 1


def _check_map(saliency: np.ndarray) -> np.ndarray:
    saliency = np.asarray(saliency)
    if saliency.ndim != 2 or saliency.size == 0:
        raise InvalidInputError(f"saliency map must be (H, W), got shape {saliency.shape}")
    if not np.isfinite(saliency).all():
        raise InvalidInputError("saliency map contains NaN or infinite values")
    return saliency.astype(np.float64, copy=False)


def normalise_map(saliency: np.ndarray) -> np.ndarray:
    """Min-max scale to float32 ``[0, 1]``; a constant map becomes all zeros."""
    values = _check_map(saliency)
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def threshold_mask(saliency: np.ndarray, percentile: float = 95.0) -> np.ndarray:
    """Pixels strictly above the ``percentile``-th percentile of the map.

    Args:
        saliency: ``(H, W)`` map.
        percentile: in ``[0, 100)``; 95 keeps the top 5 % of pixels.

    Returns:
        bool ``(H, W)``; about ``(100 - percentile) %`` of the pixels for a map without
        ties, empty for a constant map.
    """
    if not 0.0 <= percentile < 100.0:
        raise InvalidInputError(f"percentile must be in [0, 100), got {percentile}")
    values = _check_map(saliency)
    return values > np.percentile(values, percentile)


def grabcut_mask(
    image: np.ndarray,
    saliency: np.ndarray,
    fg_quantile: float = 0.95,
    bg_quantile: float = 0.30,
    iterations: int = 5,
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
    values = _check_map(saliency)
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


def largest_component_box(mask: np.ndarray) -> Box | None:
    """Bounding box of the largest 8-connected component of ``mask``.

    Args:
        mask: bool ``(H, W)``.

    Returns:
        The :class:`Box` (inclusive coordinates), or ``None`` for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InvalidInputError(f"mask must be (H, W), got shape {mask.shape}")
    if not mask.any():
        return None
    count, _, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    largest = 1 + int(np.argmax(stats[1:count, cv2.CC_STAT_AREA]))  # label 0 = background
    x, y, w, h = (int(v) for v in stats[largest, :4])
    return Box(x_min=x, y_min=y, x_max=x + w - 1, y_max=y + h - 1)
