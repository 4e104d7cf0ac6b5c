"""The synthetic data set: deterministic, balanced, correct masks, no background shortcut."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.models.synthetic import CLASS_NAMES, IMAGE_SIZE, SyntheticBatch, generate

K = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def batch() -> SyntheticBatch:
    return generate(400, seed=123)


def test_at_least_eight_distinct_classes() -> None:
    assert len(CLASS_NAMES) >= 8
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)


def test_shapes_and_dtypes(batch: SyntheticBatch) -> None:
    n = len(batch.labels)
    assert batch.images.shape == (n, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch.images.dtype == np.uint8
    assert batch.masks.shape == (n, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.masks.dtype == np.bool_
    assert batch.labels.shape == (n,)
    assert batch.labels.dtype == np.int64
    assert batch.labels.min() >= 0
    assert batch.labels.max() < K


def test_other_sizes_and_empty() -> None:
    small = generate(3, seed=1, size=64)
    assert small.images.shape == (3, 64, 64, 3)
    assert small.masks.shape == (3, 64, 64)
    assert generate(0, seed=1).images.shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3)
    with pytest.raises(ValueError):
        generate(-1, seed=1)


def test_deterministic_from_seed() -> None:
    a, b = generate(12, seed=42), generate(12, seed=42)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.labels, b.labels)
    other = generate(12, seed=43)
    assert not np.array_equal(a.images, other.images)


def test_prefix_stable() -> None:
    # Image i depends on (seed, i) only, so a small batch reproduces a large one's start.
    small, large = generate(5, seed=9), generate(30, seed=9)
    np.testing.assert_array_equal(small.images, large.images[:5])
    np.testing.assert_array_equal(small.labels, large.labels[:5])


def test_every_class_appears_balanced(batch: SyntheticBatch) -> None:
    counts = np.bincount(batch.labels, minlength=K)
    assert counts.min() == len(batch.labels) // K
    first = generate(K, seed=5).labels
    assert sorted(first.tolist()) == list(range(K))


def test_masks_nonempty_inside_image_and_one_object(batch: SyntheticBatch) -> None:
    area = batch.masks.reshape(len(batch.masks), -1).mean(axis=1)
    assert area.min() > 0.005
    assert area.max() < 0.5
    border = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    assert not (batch.masks & border).any(), "objects must lie fully inside the image"
    for mask in batch.masks:
        # One object: its largest connected part holds (nearly) all of it; a crescent's
        # thin tips may come apart after anti-aliasing.
        _, comp = cv2.connectedComponents(mask.astype(np.uint8))
        sizes = np.bincount(comp[mask])
        assert sizes.max() >= 0.95 * mask.sum()


def test_object_stands_out_from_its_surroundings(batch: SyntheticBatch) -> None:
    # Colour contrast between a band just inside the object and a band just outside it:
    # the object is the salient thing that explanations should find.
    kernel = np.ones((5, 5), np.uint8)
    contrasts = []
    for image, mask in zip(batch.images[:100], batch.masks[:100], strict=True):
        m = mask.astype(np.uint8)
        inner = (m - cv2.erode(m, kernel)).astype(bool)
        outer = (cv2.dilate(m, kernel) - m).astype(bool)
        img = image.astype(np.float64)
        contrasts.append(np.abs(img[inner].mean(0) - img[outer].mean(0)).sum())
    assert np.median(contrasts) > 80
    assert np.mean(np.asarray(contrasts) > 30) > 0.95


def _background_features(batch: SyntheticBatch) -> np.ndarray:
    feats = []
    for image, mask in zip(batch.images, batch.masks, strict=True):
        bg = image[~mask].astype(np.float64)
        feats.append(np.concatenate([bg.mean(0), bg.std(0)]))
    return np.asarray(feats)


def test_background_does_not_predict_the_class() -> None:
    data = generate(1000, seed=2024)
    x, y = _background_features(data), data.labels
    # Nearest class centroid on background colour statistics, fit on one half, scored on
    # the other: it must do no better than guessing (1 / K), up to sampling noise.
    x = (x - x.mean(0)) / x.std(0)
    half = len(y) // 2
    centroids = np.stack([x[:half][y[:half] == k].mean(0) for k in range(K)])
    pred = np.argmin(((x[half:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float((pred == y[half:]).mean())
    assert accuracy < 1.0 / K + 0.07, f"background statistics predict the class ({accuracy:.3f})"
    # And the mean background colour is uncorrelated with the class, channel by channel.
    for c in range(3):
        per_class = np.array([x[y == k, c].mean() for k in range(K)])
        assert np.abs(per_class).max() < 0.35


def test_distractor_colours_share_the_object_palette() -> None:
    # Saturated pixels occur outside the mask too (distractors), so colour alone does not
    # say where the object is.
    data = generate(60, seed=77)
    outside_saturated = 0
    for image, mask in zip(data.images, data.masks, strict=True):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        outside_saturated += int(((hsv[..., 1] > 120) & ~mask).sum() > 20)
    assert outside_saturated > 0.8 * len(data.images)
