"""Maps and masks of a reply back to arrays, with Pillow and numpy only."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service._proto.saliency.v1 import saliency_pb2 as pb


def _png(data: bytes, expected: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("L"))
    if pixels.shape != expected:
        raise ValueError(f"PNG is {pixels.shape}, the message says {expected}")
    return pixels


def decode_map(saliency: pb.SaliencyMap) -> np.ndarray:
    """float32 ``(H, W)`` values of an encoded map (8-bit PNG with its range, or float16)."""
    shape = (saliency.height, saliency.width)
    if saliency.encoding == pb.MAP_ENCODING_FLOAT16:
        return np.frombuffer(saliency.data, dtype="<f2").reshape(shape).astype(np.float32)
    pixels = _png(saliency.data, shape).astype(np.float32)
    span = saliency.value_max - saliency.value_min
    return (saliency.value_min + pixels / 255.0 * span).astype(np.float32)


def decode_mask(mask: pb.Mask) -> np.ndarray:
    """bool ``(H, W)`` of an encoded 1-bit mask; empty ``(0, 0)`` when there is none."""
    if not mask.png:
        return np.zeros((0, 0), dtype=bool)
    return _png(mask.png, (mask.height, mask.width)) > 127


def decode_rgb(png: bytes) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB pixels of a PNG (a class visualisation's image)."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))
