"""Faithfulness scores on constructed cases: a perfect map must beat a random one."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.errors import DeadlineExceededError, InvalidInputError
from service.engine.registry import SCORES
from service.engine.scores import (
    SCORE_NAMES,
    compute_scores,
    deletion_insertion_auc,
    mu_fidelity,
)
from service.engine.types import ExplainContext
from service.runtime.onnx_forward import OnnxForward
from tests.engine.nets import export_onnx

SIZE = 32
# The scores that need the forward only; the stability scores, which re-run the method,
# are in test_stability.py (and, like every score, in test_contract.py).
FORWARD_SCORES = tuple(spec.name for spec in SCORES.members() if spec.reexplains is None)
REGION = (slice(8, 20), slice(12, 24))


class RegionModel(torch.nn.Module):
    """Class 0's logit is an affine function of the mean of one region; class 1's is 0.

    Steep enough that the class is certain on the image (region mean about 0.85) and
    uncertain on its blurred copy, the insertion curve's start.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3))
        return torch.stack([20.0 * (region - 0.7), torch.zeros_like(region)], dim=1)


@pytest.fixture(scope="module")
def forward(tmp_path_factory: pytest.TempPathFactory) -> OnnxForward:
    return export_onnx(RegionModel(), tmp_path_factory.mktemp("region") / "region.onnx", SIZE)


def constant_forward(x: np.ndarray) -> np.ndarray:
    """Two equal logits whatever the input: the probability is 0.5 everywhere."""
    return np.zeros((x.shape[0], 2), dtype=np.float32)


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images with a bright region, the perfect map, a random map and the targets."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 0.3, (3, 3, SIZE, SIZE)).astype(np.float32)
    images[:, :, REGION[0], REGION[1]] = rng.uniform(0.7, 1.0, (3, 3, 12, 12))
    # The logit is linear in the region's pixels: their channel mean is the exact
    # contribution of each pixel, zero elsewhere.
    perfect = np.zeros((3, SIZE, SIZE), dtype=np.float32)
    perfect[:, REGION[0], REGION[1]] = images[:, :, REGION[0], REGION[1]].mean(axis=1)
    random = rng.uniform(0.0, 1.0, (3, SIZE, SIZE)).astype(np.float32)
    return images, perfect, random, np.zeros(3, dtype=np.int64)


def definition_auc(image: np.ndarray, saliency: np.ndarray, steps: int) -> tuple[float, float]:
    """Deletion and insertion AUC of RegionModel's class 0, from the definitions, in float64.

    Pixels go in order of decreasing saliency, ties in raster order, ``pixels / steps`` at a
    time (``steps`` divides the pixel count here, so no rounding of the cuts); a deleted
    pixel becomes black in every channel, insertion starts from a black image. The logit
    reads only the region's mean, so each point of the curve is a sum over the region's
    pixels changed so far; the AUC is the trapezoid rule over fractions ``k / steps``.
    """
    height, width = saliency.shape
    pixels = height * width
    order = sorted(range(pixels), key=lambda p: (-float(saliency.flat[p]), p))
    in_region = np.zeros((height, width), dtype=bool)
    in_region[REGION] = True
    pixel_mean = image.astype(np.float64).mean(axis=0).ravel()  # channel mean per pixel
    region_pixels = int(in_region.sum())
    changed_sum = [0.0]  # region sum of the pixels changed after k steps
    for k in range(steps):
        part = order[k * pixels // steps : (k + 1) * pixels // steps]
        changed_sum.append(changed_sum[-1] + sum(pixel_mean[p] for p in part if in_region.flat[p]))
    total = float(pixel_mean[in_region.ravel()].sum())

    def probability(region_mean: float) -> float:  # softmax of (20 (m - 0.7), 0)
        return 1.0 / (1.0 + math.exp(-20.0 * (region_mean - 0.7)))

    def area(curve: list[float]) -> float:
        return sum((a + b) / 2 / steps for a, b in itertools.pairwise(curve))

    deletion = [probability((total - s) / region_pixels) for s in changed_sum]
    insertion = [probability(s / region_pixels) for s in changed_sum]
    return area(deletion), area(insertion)


def test_deletion_and_insertion_auc_follow_their_definition(
    forward: OnnxForward, case: tuple[np.ndarray, ...]
) -> None:
    images, perfect, random, targets = case
    steps = 16  # divides the 32 x 32 pixels
    for saliency in (perfect, random):
        deletion, insertion = deletion_insertion_auc(
            forward, images, saliency, targets, steps=steps, insertion_substrate="zero"
        )
        expected = np.array(
            [definition_auc(i, s, steps) for i, s in zip(images, saliency, strict=True)]
        )
        # float32 logits of magnitude <= 20 are within ~1e-5 of float64 ones; the softmax
        # slope is at most 1/4, and an AUC is an average of probabilities.
        np.testing.assert_allclose(deletion, expected[:, 0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(insertion, expected[:, 1], rtol=0, atol=1e-5)


def test_perfect_map_beats_a_random_map_on_deletion_and_insertion(
    forward: OnnxForward, case: tuple[np.ndarray, ...]
) -> None:
    images, perfect, random, targets = case
    del_perfect, ins_perfect = deletion_insertion_auc(forward, images, perfect, targets)
    del_random, ins_random = deletion_insertion_auc(forward, images, random, targets)
    for auc in (del_perfect, ins_perfect, del_random, ins_random):
        assert auc.shape == (3,)
    assert np.all(del_perfect < del_random - 0.1)
    assert np.all(ins_perfect > ins_random + 0.1)


def test_perfect_map_has_higher_mu_fidelity(
    forward: OnnxForward, case: tuple[np.ndarray, ...]
) -> None:
    images, perfect, random, targets = case
    perfect_score = mu_fidelity(forward, images, perfect, targets, n_subsets=64)
    random_score = mu_fidelity(forward, images, random, targets, n_subsets=64)
    # The logit drop is exactly linear in the perfect map's removed saliency.
    np.testing.assert_allclose(perfect_score, 1.0, atol=1e-4)
    assert np.all(np.abs(random_score) < 0.6)
    assert np.all(perfect_score > random_score + 0.3)


def test_auc_of_a_constant_model_is_its_probability(case: tuple[np.ndarray, ...]) -> None:
    images, perfect, _, targets = case
    deletion, insertion = deletion_insertion_auc(
        constant_forward, images, perfect, targets, steps=7
    )
    np.testing.assert_allclose(deletion, 0.5)
    np.testing.assert_allclose(insertion, 0.5)


def test_scores_do_not_depend_on_chunk_size(
    forward: OnnxForward, case: tuple[np.ndarray, ...]
) -> None:
    images, _, random, targets = case
    a = compute_scores(forward, images, random, targets, FORWARD_SCORES, chunk_size=5, n_subsets=16)
    b = compute_scores(
        forward, images, random, targets, FORWARD_SCORES, chunk_size=64, n_subsets=16
    )
    for name in FORWARD_SCORES:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-9)


def test_compute_scores_returns_exactly_the_requested_names(
    forward: OnnxForward, case: tuple[np.ndarray, ...]
) -> None:
    images, perfect, _, targets = case
    calls: list[int] = []

    def counting(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return forward(x)

    only = compute_scores(counting, images, perfect, targets, ["insertion_auc"], steps=8)
    assert set(only) == {"insertion_auc"}
    assert sum(calls) == 3 * (8 + 1)  # the deletion curve was not computed
    assert compute_scores(forward, images, perfect, targets, []) == {}
    with pytest.raises(InvalidInputError, match="unknown score"):
        compute_scores(forward, images, perfect, targets, ["pointing_game"])


def test_scores_use_wire_names(forward: OnnxForward, case: tuple[np.ndarray, ...]) -> None:
    images, perfect, _, targets = case
    scores = compute_scores(forward, images, perfect, targets, ["mu_fidelity", "deletion_auc"])
    assert list(scores) == ["mu_fidelity", "deletion_auc"]
    # The wire's Score enum (less its unset value) is the list of names, not a copy here.
    wire = {name.removeprefix("SCORE_").lower() for name in pb.Score.keys()[1:]}
    assert set(SCORE_NAMES) == wire


def test_a_passed_deadline_stops_the_scores(
    forward: OnnxForward, case: tuple[np.ndarray, ...]
) -> None:
    images, perfect, _, targets = case
    ctx = ExplainContext(model=None, deadline=time.monotonic() - 1.0)
    with pytest.raises(DeadlineExceededError):
        compute_scores(forward, images, perfect, targets, FORWARD_SCORES, check=ctx.check_deadline)


def test_maps_must_match_the_images(forward: OnnxForward, case: tuple[np.ndarray, ...]) -> None:
    images, perfect, _, targets = case
    with pytest.raises(InvalidInputError, match="maps"):
        deletion_insertion_auc(forward, images, perfect[:, :8], targets)
