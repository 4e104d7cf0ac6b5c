"""Small array operations shared by methods, scores and the serving pipeline, each once."""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

Border = Literal["reflect101", "symmetric"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for probabilities near 0 and 1."""
    z = np.asarray(logits, dtype=np.float64).copy()
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _border_index(size: int, radius: int, border: Border) -> torch.Tensor:
    """Source index of each padded position along an axis of ``size`` samples.

    ``reflect101`` mirrors about the edge sample (``dcb|abcd|cba``: OpenCV's default,
    torch's ``reflect``); ``symmetric`` repeats it (``cba|abcd|dcb``: OpenCV's
    ``BORDER_REFLECT``).
    """
    index = torch.arange(-radius, size + radius)
    shift = 0 if border == "reflect101" else 1
    index = torch.where(index < 0, -index - shift, index)
    return torch.where(index >= size, 2 * size - 2 + shift - index, index)


def gaussian_blur(
    images: torch.Tensor,
    sigma: float,
    *,
    radius: int | None = None,
    border: Border = "reflect101",
) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images, channel by channel.

    Args:
        images: the images, any float dtype and device.
        sigma: standard deviation in pixels.
        radius: kernel half-width; default ``ceil(3 * sigma)`` (a 3-sigma kernel). It is
            capped so that the border reflection stays inside the image.
        border: how pixels beyond the edge are read (see :func:`_border_index`).

    Returns:
        The blurred images, same shape, dtype and device; a copy when the radius is 0.
    """
    height, width = images.shape[-2:]
    cap = min(height, width) - (1 if border == "reflect101" else 0)
    # Capped before rounding: 3 * sigma of a huge sigma is no integer (inf).
    radius = math.ceil(min(3.0 * sigma, cap)) if radius is None else min(radius, cap)
    if radius < 1:
        return images.clone()
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images)
    channels = images.shape[1]
    rows = _border_index(height, radius, border).to(images.device)
    cols = _border_index(width, radius, border).to(images.device)
    padded = images.index_select(-2, rows).index_select(-1, cols)
    across = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(across, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def box_blur(image: np.ndarray, ksize: int = 10) -> np.ndarray:
    """``(C, H, W)`` image blurred by a ``ksize`` box, the Sobol authors' substrate."""
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    return cv2.blur(hwc, (ksize, ksize)).reshape(hwc.shape).transpose(2, 0, 1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w)`` maps resized bilinearly to ``size`` ``(H, W)``, ``align_corners=False``
    (as Captum's ``LayerAttribution.interpolate``)."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
