"""What LIME and KernelSHAP share: superpixels, substrates, one pipelined pass, a linear fit.

Both switch superpixels on and off, forward each perturbed image through ONNX Runtime,
and fit ``logit ~ b + sum_j c_j z_j`` (``z_j = 1``: superpixel ``j`` kept) in float64, in
closed form; the map gives every pixel its superpixel's coefficient. Only the draws of
``z`` and their weights differ (:mod:`.lime`, :mod:`.kernel_shap`), as in Captum, where
``KernelShap`` is ``Lime`` with another kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from skimage.segmentation import slic

from service.engine import perturb
from service.engine.ops import box_blur
from service.engine.registry import InputShape, Param, ResolvedParams
from service.engine.types import Attribution, ExplainContext
from service.protocol.cost import Cost
from service.protocol.errors import InvalidInputError

BASELINES = ("mean", "zero", "blur")
SHARED = (
    # Each sample is one forward per image; the bound keeps the draws (n x segments) small.
    # 250 by default (was 1000, issue 13): on the quality bench (24 images, seed 0,
    # bench/results/fewer_forwards.md) LIME kept pointing game 1.000 and its deletion AUC
    # went 0.1463 -> 0.1376; KernelSHAP, with paired draws, 1.000 and 0.1334 -> 0.1280.
    Param(
        "n_samples", "int", 250, "perturbed images per image (forwards)", minimum=2, maximum=8192
    ),
    Param(
        "n_segments",
        "int",
        50,
        "superpixels SLIC aims for (it may return a few more or fewer)",
        minimum=2,
        maximum=1024,
    ),
    Param(
        "compactness",
        "float",
        10.0,
        "SLIC's balance of colour and space: higher gives more regular superpixels",
        minimum=0.0,
        maximum=1000.0,
        minimum_exclusive=True,
    ),
    # Blur by default, not lime's mean colour: on the default model (24 held-out images,
    # bench/quality.py's pointing game) LIME scored 1.00 with blur, 0.88 with the mean
    # colour and 0.33 with black; KernelSHAP 1.00, 0.83 and 0.50. As with Sobol, a blurred
    # superpixel stays near what the model saw; a black one does not.
    Param(
        "baseline",
        "str",
        "blur",
        "what a switched-off superpixel becomes: blur (10x10 box), mean (its colour) or zero",
        choices=BASELINES,
    ),
)
Sampler = Callable[[int, int, torch.Generator], np.ndarray]
"""``(n_samples, n_features, generator)`` -> bool draws ``(n_samples, n_features)``."""


def validate(params: ResolvedParams, input_shape: InputShape | None) -> None:
    """No more superpixels asked for than the input has pixels."""
    if input_shape is not None and int(params["n_segments"]) > input_shape[1] * input_shape[2]:
        height, width = input_shape[1:]
        raise InvalidInputError(
            f"n_segments {params['n_segments']} exceeds the {height}x{width} input's pixels"
        )


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """A forward per sample. Held at once, about: the draws (a byte per sample and
    superpixel, ``n_segments`` of them) and the fit's three float64 copies of them, the
    labels (int64) and substrate (float32) of the image, and SLIC's float64 Lab images."""
    channels, height, width = input_shape
    n_samples, n_segments = int(params["n_samples"]), int(params["n_segments"])
    fit = n_samples * n_segments * 25 + 16 * n_samples
    image = 8 * height * width + 4 * channels * height * width + 40 * channels * height * width
    return Cost(forwards=n_samples, memory_bytes=fit + image)


def superpixels(image: np.ndarray, n_segments: int, compactness: float) -> np.ndarray:
    """SLIC labels ``0..M-1`` (consecutive) of one ``(C, H, W)`` image in ``[0, 1]``."""
    if image.shape[0] == 3:
        labels = slic(
            image.transpose(1, 2, 0),
            n_segments=n_segments,
            compactness=compactness,
            start_label=0,
            channel_axis=-1,
        )
    else:
        labels = slic(
            100.0 * image.transpose(1, 2, 0),
            n_segments=n_segments,
            compactness=compactness,
            start_label=0,
            channel_axis=-1,
            convert2lab=False,
        )
    _, consecutive = np.unique(labels, return_inverse=True)
    return consecutive.reshape(labels.shape).astype(np.int64)


def substrate(image: np.ndarray, segments: np.ndarray, kind: str) -> np.ndarray:
    """The ``(C, H, W)`` image every switched-off superpixel is taken from."""
    if kind == "zero":
        return np.zeros_like(image)
    if kind == "blur":
        return box_blur(image)
    counts = np.bincount(segments.ravel())
    means = [np.bincount(segments.ravel(), c.ravel().astype(np.float64)) / counts for c in image]
    return np.stack([m[segments] for m in means]).astype(np.float32)


def fit_linear(z: np.ndarray, y: np.ndarray, weights: np.ndarray, ridge: float) -> np.ndarray:
    """Coefficients of ``min sum_i w_i (y_i - b - z_i c)^2 + ridge |c|^2`` (``b`` free).

    The intercept is eliminated by centring on the weighted means; ``ridge = 0`` takes the
    minimum-norm least-squares solution. float64 throughout.
    """
    z, y, w = z.astype(np.float64), y.astype(np.float64), weights.astype(np.float64)
    z = z - (w @ z) / w.sum()
    y = y - (w @ y) / w.sum()
    root = np.sqrt(w)
    a, b = z * root[:, None], y * root
    if ridge > 0:
        gram = a.T @ a + ridge * np.eye(a.shape[1])
        return np.linalg.solve(gram, a.T @ b)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def surrogate_maps(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    method: str,
    segmentation: tuple[int, float, str],
    n_samples: int,
    sampler: Sampler,
    weigh: Callable[[np.ndarray], np.ndarray],
    ridge: float,
) -> Attribution:
    """Superpixel coefficients of a weighted linear surrogate, as maps ``(B, H, W)``."""
    forward = perturb.require_forward(ctx, method)
    images = perturb.images_numpy(inputs)
    batch = images.shape[0]
    tgt = perturb.targets_numpy(targets, batch)
    seed = perturb.seed_from(ctx.generator)
    n_segments, compactness, baseline = segmentation
    segments, substrates, draws = [], [], []
    for image in images:
        ctx.check_deadline()  # SLIC costs milliseconds per image: not past the deadline
        labels = superpixels(image, n_segments, compactness)
        segments.append(labels)
        substrates.append(substrate(image, labels, baseline))
        n_features = int(labels.max()) + 1
        draws.append(sampler(n_samples, n_features, torch.Generator().manual_seed(seed)))

    def build(start: int, stop: int, out: np.ndarray) -> None:
        # Item-major rows: the rows of one image are consecutive, one slice of `out` each.
        for item in range(start // n_samples, (stop - 1) // n_samples + 1):
            first, last = max(start, item * n_samples), min(stop, (item + 1) * n_samples)
            rows = out[first - start : last - start]
            kept = draws[item][first - item * n_samples : last - item * n_samples]
            np.copyto(rows, substrates[item])
            np.copyto(rows, images[item], where=kept[:, segments[item]][:, None])

    logits = np.empty(batch * n_samples, dtype=np.float64)
    for start, stop, _, out in perturb.pipelined(
        forward, batch * n_samples, ctx.chunk_size, images.shape[1:], build, ctx.check_deadline
    ):
        logits[start:stop] = perturb.pick(out, tgt[np.arange(start, stop) // n_samples])
    maps = np.empty((batch, *images.shape[2:]), dtype=np.float32)
    for item, on in enumerate(draws):
        ctx.check_deadline()  # a fit of 8192 samples x 1024 superpixels takes seconds
        y = logits[item * n_samples : (item + 1) * n_samples]
        coef = fit_linear(on, y, weigh(on), ridge)
        maps[item] = coef[segments[item]]
    return Attribution(maps=torch.from_numpy(maps))
