"""No mask (and so no box): the map alone."""

from __future__ import annotations

import numpy as np

from service.engine.registry import register_mask


@register_mask("none", description="No mask and no box: the map alone", paper="")
def no_mask(image: np.ndarray, saliency: np.ndarray) -> None:
    """Nothing: the reply carries the map only.

    Args:
        image: uint8 ``(H, W, 3)``, unused.
        saliency: ``(H, W)`` map, unused.
    """
    return None
