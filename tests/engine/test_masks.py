"""Masks and boxes from saliency maps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.engine.errors import InvalidInputError
from service.engine.masks import (
    Box,
    grabcut_mask,
    largest_component_box,
    normalise_map,
    threshold_mask,
)


@pytest.mark.parametrize("percentile", [50.0, 90.0, 95.0, 99.0])
def test_threshold_keeps_the_top_fraction(percentile: float) -> None:
    saliency = np.random.default_rng(0).random((60, 80))
    mask = threshold_mask(saliency, percentile)
    assert mask.dtype == bool and mask.shape == (60, 80)
    assert abs(int(mask.sum()) - (100 - percentile) / 100 * mask.size) <= 1
    assert saliency[mask].min() > saliency[~mask].max()


def test_threshold_of_constant_map_is_empty() -> None:
    assert not threshold_mask(np.full((8, 8), 0.3)).any()
    with pytest.raises(InvalidInputError):
        threshold_mask(np.zeros((4, 4)), 100.0)
    with pytest.raises(InvalidInputError):
        threshold_mask(np.full((4, 4), np.nan))


def test_normalise_map() -> None:
    out = normalise_map(np.array([[2.0, 4.0], [3.0, 6.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.5], [0.25, 1.0]])
    assert out.dtype == np.float32
    assert not normalise_map(np.ones((3, 3))).any()


def blob_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured background with one coloured disc; saliency peaks on the disc, noisily."""
    rng = np.random.default_rng(seed)
    size = 96
    image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    image[..., 2] = rng.integers(60, 140, (size, size), dtype=np.uint8)
    truth = np.zeros((size, size), np.uint8)
    cv2.circle(truth, (55, 40), 18, 1, -1)
    jitter = rng.integers(-20, 20, (int(truth.sum()), 3))
    image[truth == 1] = np.array([230, 200, 40]) + jitter
    # A blurry map, like an upsampled CAM: it bleeds past the rim, plus background noise.
    blurred = cv2.GaussianBlur(truth.astype(np.float64), (0, 0), 8.0)
    saliency = blurred + 0.2 * rng.random((size, size))
    return image, saliency, truth.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_grabcut_recovers_a_clear_blob() -> None:
    image, saliency, truth = blob_scene()
    mask = grabcut_mask(image, saliency)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert iou(mask, truth) > 0.8
    # The seeds alone (top 5 %) cover much less than the object: GrabCut did the work.
    assert iou(threshold_mask(saliency, 95.0), truth) < 0.5


def test_grabcut_on_degenerate_maps() -> None:
    image, _, _ = blob_scene()
    assert not grabcut_mask(image, np.full((96, 96), 0.5)).any()
    sparse = np.zeros((96, 96))
    sparse[40, 50] = 1.0  # one foreground seed pixel: too few to fit a colour model
    mask = grabcut_mask(image, sparse)
    assert mask.dtype == bool and mask.shape == (96, 96)


def test_grabcut_validates_inputs() -> None:
    image, saliency, _ = blob_scene()
    with pytest.raises(InvalidInputError):
        grabcut_mask(image.astype(np.float32), saliency)
    with pytest.raises(InvalidInputError):
        grabcut_mask(image[:10], saliency)
    with pytest.raises(InvalidInputError):
        grabcut_mask(image, saliency, fg_quantile=0.2, bg_quantile=0.3)


def test_largest_component_box() -> None:
    mask = np.zeros((20, 30), bool)
    mask[2:5, 3:6] = True  # 9 pixels
    mask[10:16, 12:20] = True  # 48 pixels
    mask[16, 20] = True  # touches the big one diagonally: 8-connectivity joins it
    assert largest_component_box(mask) == Box(x_min=12, y_min=10, x_max=20, y_max=16)
    box = largest_component_box(mask)
    assert box is not None and (box.width, box.height) == (9, 7)
    single = np.zeros((5, 5), bool)
    single[4, 0] = True
    assert largest_component_box(single) == Box(0, 4, 0, 4)
    assert largest_component_box(np.zeros((5, 5), bool)) is None


def test_grabcut_mask_does_not_depend_on_earlier_calls() -> None:
    """Same image and map, same mask, whatever the worker thread ran before.

    GrabCut starts its colour models with k-means, which draws from OpenCV's per-thread
    RNG: unless the mask code fixes that state, a mask depends on the masks computed
    before it on the thread (other requests, batch mates).
    """
    from service.models.synthetic import generate

    scenes = generate(4, seed=3, size=64)
    noise = np.random.default_rng(0).random((4, 64, 64))
    saliency = [
        cv2.GaussianBlur(mask.astype(np.float64), (0, 0), 4.0) + 0.3 * extra
        for mask, extra in zip(scenes.masks, noise, strict=True)
    ]
    first = [grabcut_mask(image, s) for image, s in zip(scenes.images, saliency, strict=True)]
    again = [grabcut_mask(image, s) for image, s in zip(scenes.images, saliency, strict=True)]
    for item, (a, b) in enumerate(zip(first, again, strict=True)):
        assert np.array_equal(a, b), f"item {item}: {int((a ^ b).sum())} pixels changed"
