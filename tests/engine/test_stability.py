"""The stability scores on methods whose stability is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from service.engine.errors import DeadlineExceededError, UnsupportedMethodError
from service.engine.scores import compute_scores
from service.engine.scores.stability import spearman, stability

SIZE = 32
BOTH = ["max_sensitivity", "rank_stability"]
RNG = np.random.default_rng(0)
# Mid-grey pictures: no clipping at 0 or 1 for the radii used below.
PICTURES = RNG.uniform(0.3, 0.7, (3, 3, SIZE, SIZE)).astype(np.float32)
TARGETS = np.array([0, 1, 2])


def no_forward(x: np.ndarray) -> np.ndarray:
    raise AssertionError("the stability scores need no forward of their own")


def scores(method: object, maps: np.ndarray, **params: object) -> dict[str, np.ndarray]:
    return compute_scores(no_forward, PICTURES, maps, TARGETS, BOTH, explain=method, **params)


def pattern_method(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Ignores its input: the same non-uniform pattern for every image."""
    ramp = np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    return np.broadcast_to(np.sin(ramp) + 2.0, (len(images), SIZE, SIZE)).copy()


def flat_method(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Ignores its input and ranks nothing: one value everywhere."""
    return np.full((len(images), SIZE, SIZE), 0.25, dtype=np.float32)


def brightness_method(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The channel mean: linear in the input, so it moves exactly as much as the noise."""
    return images.mean(axis=1)


@pytest.mark.parametrize("method", [pattern_method, flat_method])
def test_a_method_that_ignores_its_input_is_perfectly_stable(method: object) -> None:
    maps = method(PICTURES, TARGETS)  # type: ignore[operator]
    values = scores(method, maps, radius=0.2)
    np.testing.assert_array_equal(values["max_sensitivity"], 0.0)
    np.testing.assert_array_equal(values["rank_stability"], 1.0)


def test_pure_noise_is_unstable() -> None:
    """A fresh uniform map per call: |a - b| / |a| is sqrt(1/6) / sqrt(1/3) = 0.71 on
    average, and the ranks of two independent maps do not correlate (1024 pixels: a
    Spearman coefficient's standard deviation is 0.03, its mean over 8 copies' 0.011)."""
    noise = np.random.default_rng(1)

    def noise_method(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return noise.uniform(0.0, 1.0, (len(images), SIZE, SIZE))

    values = scores(noise_method, noise_method(PICTURES, TARGETS), n_perturbations=8)
    assert (values["max_sensitivity"] > 0.6).all(), values
    assert (np.abs(values["rank_stability"]) < 0.1).all(), values


def test_the_noise_stays_in_the_radius_and_scales_with_it() -> None:
    """For the channel mean, each pixel of ``Phi(x + d) - Phi(x)`` is a mean of noise in
    ``[-r, r]``: the change is at most ``r sqrt(P) / |Phi(x)|``; and without clipping the
    same draws scaled by 2r move the map exactly twice as far."""
    maps = brightness_method(PICTURES, TARGETS)
    small = scores(brightness_method, maps, radius=0.05)["max_sensitivity"]
    large = scores(brightness_method, maps, radius=0.1)["max_sensitivity"]
    bound = 0.05 * SIZE / np.linalg.norm(maps.reshape(3, -1), axis=1)
    assert (small > 0).all() and (small <= bound).all()
    np.testing.assert_allclose(large, 2 * small, rtol=1e-4)


def test_images_are_clipped_into_the_pixel_range() -> None:
    seen: list[np.ndarray] = []

    def recording(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        seen.append(images)
        return brightness_method(images, targets)

    white = np.ones_like(PICTURES)
    compute_scores(no_forward, white, white.mean(axis=1), TARGETS, BOTH, explain=recording)
    assert all(images.min() >= 0.0 and images.max() <= 1.0 for images in seen)
    assert any(images.min() < 1.0 for images in seen)  # the noise did move them down


def test_both_scores_share_one_pass_of_explanations() -> None:
    calls: list[int] = []

    def counting(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return pattern_method(images, targets)

    scores(counting, pattern_method(PICTURES, TARGETS), n_perturbations=5)
    assert calls == [3] * 5  # five re-explanations of the whole batch, not ten


def test_a_zero_map_that_moves_is_infinitely_sensitive() -> None:
    zeros = np.zeros((3, SIZE, SIZE), dtype=np.float32)
    moving = scores(brightness_method, zeros)["max_sensitivity"]
    still = scores(lambda images, targets: np.zeros((len(images), SIZE, SIZE)), zeros)
    assert np.isposinf(moving).all()
    np.testing.assert_array_equal(still["max_sensitivity"], 0.0)


def test_spearman_with_ties_equals_scipys() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, (5, 200)).astype(np.float64)  # many ties
    b = a + rng.integers(0, 4, (5, 200))
    expected = [spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(spearman(a, b), expected, rtol=1e-12, atol=1e-12)


def test_constant_maps_have_a_defined_rank_correlation() -> None:
    flat, varying = np.zeros((1, 10)), np.arange(10.0)[None]
    assert spearman(flat, flat + 3.0).tolist() == [1.0]
    assert spearman(flat, varying).tolist() == [0.0]
    assert spearman(varying, flat).tolist() == [0.0]


def test_without_a_method_the_score_is_refused_before_any_work() -> None:
    with pytest.raises(UnsupportedMethodError, match="re-runs the explanation method"):
        compute_scores(no_forward, PICTURES, PICTURES[:, 0], TARGETS, ["rank_stability"])


def test_the_deadline_is_checked_before_every_re_explanation() -> None:
    calls: list[int] = []

    def counting(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return pattern_method(images, targets)

    def expire_after_two() -> None:
        if len(calls) >= 2:
            raise DeadlineExceededError("deadline exceeded")

    maps = pattern_method(PICTURES, TARGETS)
    with pytest.raises(DeadlineExceededError):
        stability(
            counting, PICTURES, maps, TARGETS, n_perturbations=8, radius=0.1, seed=0,
            check=expire_after_two,
        )  # fmt: skip
    assert calls == [3, 3]
