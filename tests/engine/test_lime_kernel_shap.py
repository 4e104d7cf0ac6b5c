"""LIME and KernelSHAP against Captum 0.9, by construction, and their draws' distributions.

Captum gets the same superpixels (as its ``feature_mask``), the same baseline image and
the same draws (fed through its ``perturb_func`` hook); it then runs its own perturbation,
forward, weighting and fit (scikit-learn's ``Ridge`` / ``LinearRegression``). The forward is
the same ONNX Runtime session, so the only differences left are float32 logits computed in
other batch sizes and the solvers' rounding: coefficients agree to ``1e-4`` of the largest
one, while a slip in the kernel, the weights, the baseline or the draws moves them far more
(the second test shows a kernel width 20% off moving them by ten times that and more).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from captum._utils.models.linear_model import SkLearnLinearRegression, SkLearnRidge
from captum.attr import KernelShap, Lime
from captum.attr._core.lime import get_exp_kernel_similarity_function
from skimage.segmentation import slic
from torch import nn

from service.engine import perturb
from service.engine.engine import Engine
from service.engine.methods.kernel_shap import kernel_shap_samples, paired_kernel_shap_samples
from service.engine.methods.lime import lime_samples
from service.engine.methods.superpixels import superpixels
from service.engine.registry import ParamValue
from service.runtime.export import export_onnx as export_model_onnx
from service.runtime.onnx_forward import OnnxForward
from tests.engine.nets import CNN_LAYER, TinyCnn, export_onnx

SIZE = 48
SEED = 7
N_SAMPLES = 300
# Smooth images and square-ish superpixels, so SLIC returns a couple of dozen of them.
PARAMS: dict[str, ParamValue] = {
    **{"n_samples": N_SAMPLES, "n_segments": 24, "compactness": 100.0},
    "baseline": "mean",  # lime's: the reference below builds it loop by loop
}
AGREEMENT = 1e-4  # of the largest coefficient


def smooth_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 5, 5), generator=gen)
    return nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic").clamp(0, 1)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, OnnxForward]:
    model = TinyCnn(seed=5)
    forward = export_onnx(model, Path(tmp_path_factory.mktemp("lime")) / "cnn.onnx", SIZE)
    engine = Engine(
        model,
        target_layer=CNN_LAYER,
        input_shape=(3, SIZE, SIZE),
        forward_numpy=forward,
        chunk_size=37,  # chunks cut through images
    )
    return engine, forward


def blurred_baseline(image: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """OpenCV's 10x10 box blur (RISE's and Sobol's substrate), channels last for OpenCV."""
    return cv2.blur(np.ascontiguousarray(image.transpose(1, 2, 0)), (10, 10)).transpose(2, 0, 1)


def mean_colour_baseline(image: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Each superpixel filled with its mean colour, written out loop by loop."""
    out = np.empty_like(image)
    for label in np.unique(segments):
        inside = segments == label
        for c in range(image.shape[0]):
            out[c][inside] = image[c][inside].mean()
    return out


def captum_attribution(
    method: str,
    forward: OnnxForward,
    image: torch.Tensor,
    target: int,
    segments: np.ndarray,
    draws: np.ndarray,
    kernel_width: float = 0.25,
    baseline: str = "mean",
) -> np.ndarray:
    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(forward(x.detach().numpy().astype(np.float32)))

    def our_draws(_original: torch.Tensor, **_kwargs: object) -> Iterator[torch.Tensor]:
        for row in draws:
            yield torch.from_numpy(row[None].astype(np.int64))

    explainer: Lime
    if method == "lime":
        # lime_image's kernel: on the interpretable vector, against all-ones (the image).
        kernel = get_exp_kernel_similarity_function("cosine", kernel_width)

        def similarity(_x: object, _perturbed: object, interpretable: torch.Tensor, **_: object):
            return kernel(torch.ones_like(interpretable).float(), interpretable.float(), None)

        explainer = Lime(
            model,
            interpretable_model=SkLearnRidge(alpha=1.0),
            similarity_func=similarity,
            perturb_func=our_draws,
        )
    else:
        explainer = KernelShap(model)  # Shapley weights, 1e6 endpoints, LinearRegression
        explainer.perturb_func = our_draws
        assert isinstance(explainer.interpretable_model, SkLearnLinearRegression)
    substrate = {"mean": mean_colour_baseline, "blur": blurred_baseline}[baseline]
    switched_off = substrate(image.numpy()[0], segments)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's and Captum's notices
        attribution = explainer.attribute(
            image,
            target=target,
            baselines=torch.from_numpy(switched_off)[None],
            feature_mask=torch.from_numpy(segments)[None, None],
            n_samples=len(draws),
            perturbations_per_eval=64,
        )
    return attribution[0, 0].numpy().astype(np.float64)


def documented_draws(method: str, n_features: int, sampling: str = "paired") -> np.ndarray:
    """The module's convention: one seed from the request's generator, the same per image."""
    seed = perturb.seed_from(torch.Generator().manual_seed(SEED))
    sampler = {
        "lime": lime_samples,
        "kernel_shap": paired_kernel_shap_samples if sampling == "paired" else kernel_shap_samples,
    }[method]
    return sampler(N_SAMPLES, n_features, torch.Generator().manual_seed(seed))


def test_superpixels_are_slics() -> None:
    image = smooth_images(1, seed=3)[0].numpy()
    ours = superpixels(image, 24, 100.0)
    theirs = slic(image.transpose(1, 2, 0), n_segments=24, compactness=100.0, start_label=0)
    # The same partition, labelled 0..M-1 (SLIC's labels are already consecutive here).
    np.testing.assert_array_equal(ours, theirs)
    assert 12 <= ours.max() + 1 <= 40


def test_other_channel_counts_are_segmented_on_the_lab_lightness_scale(tmp_path: Path) -> None:
    """One channel in [0, 1] is SLIC'd as values in [0, 100], the range of Lab's L, so that
    ``compactness`` weighs colour against space as it does for RGB; and a one-channel
    model is explained end to end."""
    grey = smooth_images(1, seed=5)[0, :1]
    ours = superpixels(grey.numpy(), 24, 10.0)
    theirs = slic(
        100.0 * grey.numpy().transpose(1, 2, 0),
        n_segments=24,
        compactness=10.0,
        start_label=0,
        channel_axis=-1,
        convert2lab=False,
    )
    np.testing.assert_array_equal(ours, theirs)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))  # fmt: skip
    forward = OnnxForward(export_model_onnx(model.eval(), (1, SIZE, SIZE), tmp_path / "g.onnx"))
    engine = Engine(model, input_shape=(1, SIZE, SIZE), forward_numpy=forward)
    maps = engine.explain(grey[None], [1], "kernel_shap", PARAMS, seed=1).maps
    assert maps.shape == (1, SIZE, SIZE) and bool(torch.isfinite(maps).all())


@pytest.mark.parametrize("baseline", ["mean", "blur"])
@pytest.mark.parametrize(
    ("method", "sampling"),
    [("lime", ""), ("kernel_shap", "paired"), ("kernel_shap", "independent")],
)
def test_equals_captum_on_the_same_segments_and_draws(
    case: tuple[Engine, OnnxForward], method: str, sampling: str, baseline: str
) -> None:
    engine, forward = case
    x = smooth_images(3, seed=11)
    targets = [2, 4, 1]
    params = {**PARAMS, "baseline": baseline, **({"sampling": sampling} if sampling else {})}
    ours = engine.explain(x, targets, method, params, seed=SEED).maps.numpy()
    for b, target in enumerate(targets):
        segments = superpixels(x[b].numpy(), 24, 100.0)
        draws = documented_draws(method, int(segments.max()) + 1, sampling)
        theirs = captum_attribution(
            method, forward, x[b : b + 1], target, segments, draws, baseline=baseline
        )
        scale = float(np.abs(theirs).max())
        assert scale > 1e-3
        np.testing.assert_allclose(ours[b], theirs, rtol=0, atol=AGREEMENT * scale)


def test_the_comparison_catches_a_kernel_slip(case: tuple[Engine, OnnxForward]) -> None:
    """The agreement asked above is tight enough to see a kernel width 20% off."""
    engine, forward = case
    x = smooth_images(1, seed=11)
    ours = engine.explain(x, [2], "lime", PARAMS, seed=SEED).maps.numpy()[0]
    segments = superpixels(x[0].numpy(), 24, 100.0)
    draws = documented_draws("lime", int(segments.max()) + 1)
    slipped = captum_attribution("lime", forward, x, 2, segments, draws, kernel_width=0.3)
    assert np.abs(ours - slipped).max() > 10 * AGREEMENT * np.abs(slipped).max()


class PixelLinear(nn.Module):
    """Class 1's logit is ``sum W * x``: linear in every pixel, so in every superpixel."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn((3, SIZE, SIZE), generator=torch.Generator()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.weight).flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_a_linear_model_gets_each_superpixels_exact_contribution(
    tmp_path: Path, method: str
) -> None:
    """Known by construction: with a black baseline, switching superpixel j on adds
    ``sum_{p in j} W_p x_p`` to the logit, whatever else is on; a fit with no penalty
    recovers exactly that (LIME only with ``ridge = 0``)."""
    model = PixelLinear()
    forward = export_onnx(model, tmp_path / "linear.onnx", SIZE)
    engine = Engine(model, input_shape=(3, SIZE, SIZE), forward_numpy=forward)
    x = smooth_images(2, seed=4)
    params = {**PARAMS, "baseline": "zero", **({"ridge": 0.0} if method == "lime" else {})}
    maps = engine.explain(x, [1, 1], method, params, seed=2).maps.numpy()
    weight = model.weight.detach().numpy()
    for b in range(2):
        segments = superpixels(x[b].numpy(), 24, 100.0)
        contribution = (weight * x[b].numpy()).sum(axis=0)
        expected = np.zeros((SIZE, SIZE))
        for label in np.unique(segments):
            expected[segments == label] = contribution[segments == label].sum()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(maps[b], expected, rtol=0, atol=1e-4 * scale)


def test_kernel_shap_values_add_up_to_the_logit_change(case: tuple[Engine, OnnxForward]) -> None:
    """Efficiency: the superpixels' values sum to ``f(x) - f(baseline)`` (the 1e6 endpoint
    weights enforce it up to a millionth of the fit's residual)."""
    engine, forward = case
    x = smooth_images(2, seed=21)
    maps = engine.explain(x, [3, 1], "kernel_shap", PARAMS, seed=SEED).maps.numpy()
    for b, target in enumerate([3, 1]):
        segments = superpixels(x[b].numpy(), 24, 100.0)
        values = [maps[b][segments == label][0] for label in np.unique(segments)]
        image = x[b].numpy()
        ends = forward(np.stack([image, mean_colour_baseline(image, segments)]))[:, target]
        change = float(ends[0] - ends[1])
        assert abs(sum(values) - change) <= 1e-3 * max(abs(change), np.abs(values).max())


def test_lime_draws_keep_each_superpixel_with_probability_one_half() -> None:
    draws = lime_samples(4001, 20, torch.Generator().manual_seed(0))
    assert draws.dtype == bool and draws.shape == (4001, 20)
    assert draws[0].all()  # the image itself, as lime_image's first row
    # 80,000 fair coins: the mean is 0.5 within 6 standard deviations (0.0018 each).
    assert abs(draws[1:].mean() - 0.5) < 0.011
    assert np.abs(draws[1:].mean(axis=0) - 0.5).max() < 6 * 0.5 / np.sqrt(4000)


@pytest.mark.parametrize("sampler", [kernel_shap_samples, paired_kernel_shap_samples])
def test_kernel_shap_draws_follow_the_shapley_kernel(
    sampler: Callable[[int, int, torch.Generator], np.ndarray],
) -> None:
    """Each row follows the kernel, paired or not (the kernel is symmetric in k <-> M - k,
    so a complement has the same law); a paired row's count is at most sqrt(2) noisier,
    which the 6-sigma bound absorbs."""
    n_features, rows = 10, 20_002
    draws = sampler(rows, n_features, torch.Generator().manual_seed(1))
    assert draws[0].all() and not draws[1].any()
    sizes = draws[2:].sum(axis=1)
    k = np.arange(1, n_features)
    expected = (n_features - 1) / (k * (n_features - k))
    expected /= expected.sum()
    observed = np.array([(sizes == size).mean() for size in k])
    assert observed.sum() == 1.0  # never empty, never full
    sigma = np.sqrt(expected * (1 - expected) / (rows - 2))
    assert (np.abs(observed - expected) < 6 * sigma).all(), (observed, expected)
    # Given its size, a subset is uniform: every feature is in it equally often.
    for size in (1, 5, 9):
        chosen = draws[2:][sizes == size].mean(axis=0)
        spread = np.sqrt((size / n_features) * (1 - size / n_features) / (sizes == size).sum())
        assert np.abs(chosen - size / n_features).max() < 6 * spread + 1e-12


def test_a_map_does_not_depend_on_its_batch_or_the_chunk_size(
    case: tuple[Engine, OnnxForward],
) -> None:
    engine, forward = case
    x = smooth_images(3, seed=30)
    batch = engine.explain(x, [1, 2, 3], "lime", PARAMS, seed=4).maps
    other = Engine(engine.model, input_shape=(3, SIZE, SIZE), forward_numpy=forward, chunk_size=5)
    alone = other.explain(x[1:2], [2], "lime", PARAMS, seed=4).maps[0]
    torch.testing.assert_close(alone, batch[1], rtol=0, atol=1e-5 * float(batch[1].abs().max()))


@pytest.mark.parametrize("rows", [2, 3, 250, 251])
def test_paired_draws_are_a_subset_then_its_complement(rows: int) -> None:
    draws = paired_kernel_shap_samples(rows, 12, torch.Generator().manual_seed(3))
    assert draws.shape == (rows, 12) and draws[0].all() and not draws[1].any()
    body = draws[2:]
    pairs = len(body) // 2
    np.testing.assert_array_equal(body[1 : 2 * pairs : 2], ~body[0 : 2 * pairs : 2])
    # Drawn rows are never empty or full, so neither is a complement.
    sizes = body.sum(axis=1)
    assert ((sizes > 0) & (sizes < 12)).all()
    # Not the same rows as independent draws from the same seed: the pairing is real.
    alone = kernel_shap_samples(rows, 12, torch.Generator().manual_seed(3))
    if rows > 3:
        assert not np.array_equal(draws, alone)
