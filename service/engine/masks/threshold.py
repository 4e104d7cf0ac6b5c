"""The percentile threshold: the most salient pixels (Simonyan et al. 2013, sec. 3.1)."""

from __future__ import annotations

import numpy as np

from service.engine.masks.base import check_map
from service.engine.registry import Param, register_mask
from service.protocol.errors import InvalidInputError

SIMONYAN_2013 = "https://arxiv.org/abs/1312.6034"
PERCENTILE = 95.0
PARAMS = (
    Param(
        "percentile",
        "float",
        PERCENTILE,
        "percentile of the map above which pixels are foreground (95 keeps the top 5%)",
        minimum=0.0,
        maximum=100.0,
        maximum_exclusive=True,
    ),
)


def threshold_mask(saliency: np.ndarray, percentile: float = PERCENTILE) -> np.ndarray:
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
    values = check_map(saliency)
    return values > np.percentile(values, percentile)


@register_mask(
    "threshold",
    params=PARAMS,
    description="Pixels above a percentile of the map (Simonyan et al. 2013, sec. 3.1)",
    paper=SIMONYAN_2013,
)
def threshold(image: np.ndarray, saliency: np.ndarray, *, percentile: float) -> np.ndarray:
    """:func:`threshold_mask` of the map; the image is not used."""
    return threshold_mask(saliency, percentile)
