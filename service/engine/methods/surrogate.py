"""LIME and KernelSHAP: a weighted linear surrogate of the target logit over superpixels.

Both switch superpixels on and off, forward each perturbed image through ONNX Runtime,
and fit ``logit ~ b + sum_j c_j z_j`` (``z_j = 1``: superpixel ``j`` kept); the map gives
every pixel its superpixel's coefficient ``c_j`` (signed: positive supports the target).
They differ only in which ``z`` they draw and how they weight them, as in Captum, where
``KernelShap`` is ``Lime`` with another kernel.

* **Superpixels**: scikit-image's SLIC (``start_label=0``, its defaults otherwise) on the
  model-resolution image; RGB is converted to Lab as SLIC does by default, other channel
  counts are scaled to ``[0, 100]`` (Lab's lightness range) so that ``compactness`` means
  the same. scikit-image rather than OpenCV's ``ximgproc``: that lives in the contrib
  build, which would replace the headless OpenCV the service pins.
* **Switched-off superpixels** take the ``baseline``: ``mean`` (the superpixel's mean
  colour, lime's default), ``zero`` or ``blur`` (10x10 box blur, as RISE and Sobol).
* **Draws**: ``s = seed_from(request generator)``; image ``b``'s draws come from
  ``torch.Generator().manual_seed(s)`` for every ``b``, so a map never depends on the
  batch it was computed in. See :func:`lime_samples` and :func:`kernel_shap_samples`.
* **LIME** (Ribeiro et al. 2016, as ``lime_image``): row 0 keeps every superpixel, the
  others keep each with probability 1/2. Weight ``exp(-d^2 / (2 w^2))`` with ``d`` the
  cosine distance between ``z`` and all-ones (1 for the all-off row) and ``w`` the
  ``kernel_width``; ridge regression (``ridge``, intercept not penalised), as lime's
  ``Ridge(alpha=1)``.
* **KernelSHAP** (Lundberg & Lee 2017, as Captum's ``KernelShap``): rows 0 and 1 keep
  all / none of the superpixels, then each row draws its size ``k`` in ``1..M-1`` with
  probability proportional to ``(M - 1) / (k (M - k))`` and a uniform subset of that size:
  the Shapley kernel as a sampling distribution, so those rows weigh 1. The all-on and
  all-off rows weigh ``1e6``: Captum's stand-in for the infinite weight that forces
  ``b = f(baseline)`` and ``b + sum c = f(x)``. Unregularised least squares, the
  minimum-norm solution when the rows do not determine every coefficient.
* Both fits run in float64, in closed form, on the target **logit** (as occlusion and
  MuFidelity: attributions add up in the logit, and softmax saturates).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from skimage.segmentation import slic

from service.engine import perturb
from service.engine.ops import box_blur
from service.engine.registry import InputShape, Param, ResolvedParams, register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.errors import InvalidInputError

RIBEIRO_2016 = "https://arxiv.org/abs/1602.04938"
LUNDBERG_2017 = "https://arxiv.org/abs/1705.07874"
BASELINES = ("mean", "zero", "blur")
ENDPOINT_WEIGHT = 1e6  # Captum's KernelShap.inf_weight
SHARED = (
    # Each sample is one forward per image; the bound keeps the draws (n x segments) small.
    Param(
        "n_samples", "int", 1000, "perturbed images per image (forwards)", minimum=2, maximum=8192
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
    Param(
        "baseline",
        "str",
        "mean",
        "what a switched-off superpixel becomes: mean (its mean colour), zero or blur",
        choices=BASELINES,
    ),
)
LIME_PARAMS = (
    *SHARED,
    Param(
        "kernel_width",
        "float",
        0.25,
        "width of the exponential kernel on the cosine distance to the image (lime's 0.25)",
        minimum=0.0,
        maximum=100.0,
        minimum_exclusive=True,
    ),
    Param(
        "ridge",
        "float",
        1.0,
        "L2 penalty of the surrogate's coefficients (lime's Ridge alpha)",
        minimum=0.0,
        maximum=1e6,
    ),
)

Sampler = Callable[[int, int, torch.Generator], np.ndarray]


def _validate(params: ResolvedParams, input_shape: InputShape | None) -> None:
    if input_shape is not None and int(params["n_segments"]) > input_shape[1] * input_shape[2]:
        height, width = input_shape[1:]
        raise InvalidInputError(
            f"n_segments {params['n_segments']} exceeds the {height}x{width} input's pixels"
        )


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


def lime_samples(n_samples: int, n_features: int, generator: torch.Generator) -> np.ndarray:
    """bool ``(n_samples, n_features)``: row 0 all on, then each feature on with p = 1/2."""
    on = torch.rand((n_samples, n_features), generator=generator) < 0.5
    on[0] = True
    return on.numpy()


def kernel_shap_samples(n_samples: int, n_features: int, generator: torch.Generator) -> np.ndarray:
    """bool ``(n_samples, n_features)``: all on, all off, then Shapley-kernel subset sizes."""
    on = torch.zeros((n_samples, n_features), dtype=torch.bool)
    on[0] = True
    rest = n_samples - 2
    if rest > 0 and n_features > 1:
        size = torch.arange(1, n_features, dtype=torch.float64)
        probs = (n_features - 1) / (size * (n_features - size))
        k = torch.multinomial(probs, rest, replacement=True, generator=generator) + 1
        # A uniform subset of size k: the k features with the smallest uniform keys.
        rank = torch.rand((rest, n_features), generator=generator).argsort(1).argsort(1)
        on[2:] = rank < k[:, None]
    elif rest > 0:  # one feature: all on and all off are the only rows there are
        on[2::2] = True
    return on.numpy()


def lime_weights(on: np.ndarray, kernel_width: float) -> np.ndarray:
    """``exp(-d^2 / (2 w^2))``, ``d`` the cosine distance from ``z`` to all-ones."""
    distance = 1.0 - np.sqrt(on.sum(axis=1) / on.shape[1])
    return np.exp(-(distance**2) / (2.0 * kernel_width**2))


def kernel_shap_weights(on: np.ndarray) -> np.ndarray:
    """1 for sampled rows, ``1e6`` for the all-on and all-off rows."""
    size = on.sum(axis=1)
    return np.where((size == 0) | (size == on.shape[1]), ENDPOINT_WEIGHT, 1.0)


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
        y = logits[item * n_samples : (item + 1) * n_samples]
        coef = fit_linear(on, y, weigh(on), ridge)
        maps[item] = coef[segments[item]]
    return Attribution(maps=torch.from_numpy(maps))


@register_method(
    "lime",
    backend="onnx",
    needs_gradients=False,
    params=LIME_PARAMS,
    validate=_validate,
    description="Ridge surrogate of the target logit over random superpixel subsets, "
    "weighted by closeness to the image (Ribeiro et al. 2016, LIME)",
    paper=RIBEIRO_2016,
)
def lime(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int,
    n_segments: int,
    compactness: float,
    baseline: str,
    kernel_width: float,
    ridge: float,
) -> Attribution:
    """LIME over SLIC superpixels (the module docstring states every convention).

    Args:
        ctx: request context; ``forward_numpy``, ``generator``, ``chunk_size``, deadline.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        n_samples, n_segments, compactness, baseline, kernel_width, ridge: see
            ``LIME_PARAMS``.

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps: each pixel its superpixel's
        coefficient, in logit units. Costs ``B * n_samples`` forwards.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.

    Paper: https://arxiv.org/abs/1602.04938
    """
    return surrogate_maps(
        ctx,
        inputs,
        targets,
        "lime",
        (n_segments, compactness, baseline),
        n_samples,
        lime_samples,
        lambda on: lime_weights(on, kernel_width),
        ridge,
    )


@register_method(
    "kernel_shap",
    backend="onnx",
    needs_gradients=False,
    params=SHARED,
    validate=_validate,
    description="Shapley values of superpixels from a least-squares fit under the Shapley "
    "kernel (Lundberg & Lee 2017, KernelSHAP)",
    paper=LUNDBERG_2017,
)
def kernel_shap(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int,
    n_segments: int,
    compactness: float,
    baseline: str,
) -> Attribution:
    """KernelSHAP over SLIC superpixels (the module docstring states every convention).

    Args:
        ctx: request context; ``forward_numpy``, ``generator``, ``chunk_size``, deadline.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        n_samples, n_segments, compactness, baseline: see ``SHARED``.

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps: each pixel its superpixel's
        Shapley value estimate, in logit units; they sum (over superpixels) to
        ``f(x) - f(baseline)`` up to the endpoint weight's slack. Costs ``B * n_samples``
        forwards.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.

    Paper: https://arxiv.org/abs/1705.07874
    """
    return surrogate_maps(
        ctx,
        inputs,
        targets,
        "kernel_shap",
        (n_segments, compactness, baseline),
        n_samples,
        kernel_shap_samples,
        kernel_shap_weights,
        0.0,
    )
