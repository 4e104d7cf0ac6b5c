"""Heat-map overlays of a map on its image (numpy colour table, Pillow drawing)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from service._proto.saliency.v1 import saliency_pb2 as pb


def _jet() -> np.ndarray:
    """The classic jet colour table, ``(256, 3)`` uint8: blue, cyan, yellow, red."""
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4.0 * x - offset), 0.0, 1.0) for offset in (3.0, 2.0, 1.0)]
    return np.round(np.stack(channels, axis=1) * 255.0).astype(np.uint8)


JET = _jet()


def overlay(image_rgb: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The map as a jet heat map over the image: uint8 ``(H, W, 3)`` RGB.

    Args:
        image_rgb: uint8 ``(H, W, 3)``.
        saliency: ``(H, W)`` map, any range (scaled to its min and max).
        alpha: weight of the heat map.
    """
    values = np.asarray(saliency, dtype=np.float64)
    span = float(values.max() - values.min()) or 1.0
    index = np.round(255.0 * (values - values.min()) / span).astype(np.uint8)
    blended = (1.0 - alpha) * image_rgb + alpha * JET[index]
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def draw_box(
    image_rgb: np.ndarray, box: pb.Box, colour: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """A copy of the image with the (inclusive) box outlined one pixel wide."""
    canvas = Image.fromarray(np.ascontiguousarray(image_rgb))
    ImageDraw.Draw(canvas).rectangle((box.x_min, box.y_min, box.x_max, box.y_max), outline=colour)
    return np.asarray(canvas)
