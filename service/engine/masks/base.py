"""What every mask shares: map checks, normalisation, and the box of the largest component.

All functions take a 2-D float map at image resolution, larger meaning more salient, and
never raise on a degenerate (constant) map: they return an empty mask or ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from service.protocol.errors import InvalidInputError


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


def check_map(saliency: np.ndarray) -> np.ndarray:
    """The map as float64 ``(H, W)``; ``InvalidInputError`` if empty, not 2-D or not finite."""
    saliency = np.asarray(saliency)
    if saliency.ndim != 2 or saliency.size == 0:
        raise InvalidInputError(f"saliency map must be (H, W), got shape {saliency.shape}")
    if not np.isfinite(saliency).all():
        raise InvalidInputError("saliency map contains NaN or infinite values")
    return saliency.astype(np.float64, copy=False)


def normalise_map(saliency: np.ndarray) -> np.ndarray:
    """Min-max scale to float32 ``[0, 1]``; a constant map becomes all zeros."""
    values = check_map(saliency)
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


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
