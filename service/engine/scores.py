"""Faithfulness scores of a saliency map, for any method, on the ONNX Runtime forward.

* Deletion / insertion AUC (Petsiuk et al. 2018, RISE, https://arxiv.org/abs/1806.07421):
  pixels are removed from the image (deletion) or added to a blurred copy (insertion) in
  order of decreasing saliency, ``steps`` equal fractions at a time; the score is the area
  under the target class softmax probability against the fraction of pixels changed
  (trapezoid rule on ``[0, 1]``, so it lies in ``[0, 1]``). A faithful map gives a *low*
  deletion AUC and a *high* insertion AUC.
* MuFidelity (Bhatt et al. 2020, https://arxiv.org/abs/2005.00631): random subsets of the
  cells of a coarse grid are set to a baseline; the score is the Pearson correlation,
  across subsets, between the saliency removed and the drop of the target logit. Logits,
  not probabilities, because attributions are additive in the logit and softmax
  saturates. In ``[-1, 1]``; higher is better.

Every score runs batched forwards of ``chunk_size`` and calls ``check`` (e.g.
``ExplainContext.check_deadline``) before each chunk, so a passed deadline raises before
any score is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from service.engine import perturb
from service.engine.ops import gaussian_blur, softmax
from service.engine.types import NumpyForward
from service.protocol.errors import InvalidInputError

SCORE_NAMES = ("deletion_auc", "insertion_auc", "mu_fidelity")
"""Names of the scores as they go on the wire."""

SUBSTRATES = ("zero", "blur", "mean")


@dataclass(frozen=True)
class FaithfulnessScores:
    """Per-image scores of one map batch; a field is ``None`` when it was not requested."""

    deletion_auc: np.ndarray | None = None
    insertion_auc: np.ndarray | None = None
    mu_fidelity: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        """The computed scores keyed by their wire names (see :data:`SCORE_NAMES`)."""
        return {k: v for k in SCORE_NAMES if (v := getattr(self, k)) is not None}


def _validate(
    images: np.ndarray, maps: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.ascontiguousarray(images, dtype=np.float32)
    maps = np.asarray(maps, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if images.ndim != 4:
        raise InvalidInputError(f"expected images (N, C, H, W), got shape {images.shape}")
    n, _, h, w = images.shape
    if maps.shape != (n, h, w):
        raise InvalidInputError(f"expected maps of shape {(n, h, w)}, got {maps.shape}")
    if targets.shape != (n,):
        raise InvalidInputError(f"expected {n} targets, got {targets.shape[0]}")
    return images, maps, targets


def _substrate(images: np.ndarray, kind: str) -> np.ndarray:
    if kind == "zero":
        return np.zeros_like(images)
    if kind == "blur":
        blurred = gaussian_blur(torch.from_numpy(images), 5.0, radius=5, border="symmetric")
        return blurred.numpy()
    if kind == "mean":
        return np.broadcast_to(images.mean(axis=(2, 3), keepdims=True), images.shape).copy()
    raise InvalidInputError(f"substrate must be one of {SUBSTRATES}, got {kind!r}")


def deletion_insertion_auc(
    forward: NumpyForward,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    *,
    steps: int = 32,
    deletion_substrate: str = "zero",
    insertion_substrate: str = "blur",
    chunk_size: int = 32,
    check: perturb.Check | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC of the target probability, as defined by RISE.

    Args:
        forward: ``(N, C, H, W) -> (N, K)`` logits.
        images: float32 ``(N, C, H, W)`` pixels in ``[0, 1]``.
        maps: ``(N, H, W)`` saliency, larger = more important; ties keep raster order.
        targets: ``(N,)`` class per image.
        steps: each curve has ``steps + 1`` points, at fractions ``0, 1/steps, ..., 1``.
        deletion_substrate: what removed pixels become: ``"zero"`` (RISE: black),
            ``"blur"`` (Gaussian, kernel 11, sigma 5) or ``"mean"`` (per-channel mean).
        insertion_substrate: the image pixels are inserted into; RISE uses ``"blur"``.
        chunk_size: perturbed images per forward.
        check: called before every forward; raises to stop (deadline).

    Returns:
        ``(deletion_auc, insertion_auc)``, each float64 ``(N,)`` in ``[0, 1]``.
        Costs ``2 * N * (steps + 1)`` forwards.
    """
    aucs = _auc(
        forward,
        images,
        maps,
        targets,
        {"deletion": deletion_substrate, "insertion": insertion_substrate},
        steps=steps,
        chunk_size=chunk_size,
        check=check,
    )
    return aucs["deletion"], aucs["insertion"]


def _auc(
    forward: NumpyForward,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    curves: dict[str, str],
    *,
    steps: int,
    chunk_size: int,
    check: perturb.Check | None,
) -> dict[str, np.ndarray]:
    """AUC of each requested curve (``"deletion"``/``"insertion"`` -> substrate), one pass."""
    images, maps, targets = _validate(images, maps, targets)
    if steps < 1:
        raise InvalidInputError(f"steps must be >= 1, got {steps}")
    n, _, h, w = images.shape
    pixels = h * w
    # rank[b, p] = position of pixel p in decreasing saliency; a pixel is changed at step k
    # when its rank is below cut[k].
    order = np.argsort(-maps.reshape(n, pixels), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(pixels), order.shape), axis=1)
    cut = np.rint(np.linspace(0, pixels, steps + 1)).astype(np.int64)
    # sources[0] is the image, then one substrate per curve. Where a pixel is changed the
    # sample takes `changed_src`, elsewhere `kept_src`: deletion swaps the image for its
    # substrate, insertion swaps the substrate for the image.
    names = list(curves)
    sources = np.stack([images] + [_substrate(images, curves[name]) for name in names])
    changed_src = np.array([i + 1 if name == "deletion" else 0 for i, name in enumerate(names)])
    kept_src = np.array([0 if name == "deletion" else i + 1 for i, name in enumerate(names)])

    per_image = len(names) * (steps + 1)

    def build(start: int, stop: int, out: np.ndarray) -> None:
        item, rest = np.divmod(np.arange(start, stop), per_image)
        curve, k = np.divmod(rest, steps + 1)
        changed = (rank[item] < cut[k, None]).reshape(-1, 1, h, w)
        out[...] = np.where(
            changed, sources[changed_src[curve], item], sources[kept_src[curve], item]
        )

    prob = np.empty(n * per_image, dtype=np.float64)
    for start, stop, _, logits in perturb.pipelined(
        forward, n * per_image, chunk_size, images.shape[1:], build, check
    ):
        item = np.arange(start, stop) // per_image
        prob[start:stop] = perturb.pick(softmax(logits), targets[item])
    y = prob.reshape(n, len(names), steps + 1)
    x = cut / pixels
    auc = np.clip(np.sum((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2.0, axis=-1), 0.0, 1.0)
    return {name: auc[:, i] for i, name in enumerate(names)}


def mu_fidelity(
    forward: NumpyForward,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    *,
    n_subsets: int = 128,
    subset_fraction: float = 0.2,
    grid_size: int = 9,
    baseline: float = 0.0,
    seed: int = 0,
    chunk_size: int = 32,
    check: perturb.Check | None = None,
) -> np.ndarray:
    """MuFidelity: correlation of removed saliency with the drop of the target logit.

    Args:
        forward: ``(N, C, H, W) -> (N, K)`` logits.
        images: float32 ``(N, C, H, W)`` pixels in ``[0, 1]``.
        maps: ``(N, H, W)`` saliency.
        targets: ``(N,)`` class per image.
        n_subsets: random subsets per image (the same subsets for every image).
        subset_fraction: fraction of the grid cells set to ``baseline`` in each subset.
        grid_size: cells per side of the grid the subsets are drawn on (Xplique uses 9).
        baseline: value of removed pixels.
        seed: seed of the subsets, for reproducible scores.
        chunk_size: perturbed images per forward.
        check: called before every forward; raises to stop (deadline).

    Returns:
        float64 ``(N,)`` Pearson correlations in ``[-1, 1]``; 0 where either side has no
        variance (a constant map, or a model blind to every subset). Costs
        ``N * (n_subsets + 1)`` forwards.
    """
    images, maps, targets = _validate(images, maps, targets)
    if n_subsets < 1 or grid_size < 1:
        raise InvalidInputError("n_subsets and grid_size must be >= 1")
    if not 0.0 < subset_fraction < 1.0:
        raise InvalidInputError(f"subset_fraction must be in (0, 1), got {subset_fraction}")
    n, _, h, w = images.shape
    cells = grid_size * grid_size
    cell_of = ((np.arange(h) * grid_size) // h)[:, None] * grid_size + (
        (np.arange(w) * grid_size) // w
    )[None, :]
    rng = np.random.default_rng(seed)
    size = max(1, round(subset_fraction * cells))
    chosen = np.zeros((n_subsets, cells), dtype=bool)
    for s in range(n_subsets):
        chosen[s, rng.choice(cells, size=size, replace=False)] = True
    removed = chosen[:, cell_of]  # (S, H, W)
    saliency_removed = removed.reshape(n_subsets, -1).astype(np.float64) @ maps.reshape(n, -1).T

    base = np.empty(n, dtype=np.float64)
    for start, stop in perturb.chunks(n, chunk_size, check):
        logits = forward(images[start:stop])
        base[start:stop] = perturb.pick(logits, targets[start:stop])
    drop = np.empty((n_subsets, n), dtype=np.float64)
    fill = np.float32(baseline)

    def build(start: int, stop: int, out: np.ndarray) -> None:
        subset, item = np.divmod(np.arange(start, stop), n)
        out[...] = np.where(removed[subset][:, None], fill, images[item])

    for start, stop, _, logits in perturb.pipelined(
        forward, n_subsets * n, chunk_size, images.shape[1:], build, check
    ):
        subset, item = np.divmod(np.arange(start, stop), n)
        drop[subset, item] = base[item] - perturb.pick(logits, targets[item])
    return _pearson(saliency_removed, drop)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Pearson correlation of two ``(S, N)`` arrays; 0 where undefined."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    num = (a * b).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 1e-12 * (1.0 + np.abs(num)), num / denom, 0.0)
    return np.clip(corr, -1.0, 1.0)


def compute_scores(
    forward: NumpyForward,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    which: Sequence[str],
    *,
    steps: int = 32,
    n_subsets: int = 128,
    seed: int = 0,
    chunk_size: int = 32,
    check: perturb.Check | None = None,
) -> dict[str, np.ndarray]:
    """The requested scores of one batch of maps, keyed by wire name.

    Args:
        forward, images, maps, targets: as in :func:`deletion_insertion_auc`.
        which: names from :data:`SCORE_NAMES`; deletion and insertion share one pass.
        steps: curve resolution of the AUCs.
        n_subsets: subsets of MuFidelity.
        seed: seed of MuFidelity's subsets.
        chunk_size: perturbed images per forward.
        check: called before every forward; raises to stop (deadline).

    Returns:
        ``{name: float64 (N,)}`` for each requested name, nothing else.
    """
    unknown = sorted(set(which) - set(SCORE_NAMES))
    if unknown:
        raise InvalidInputError(f"unknown score(s) {unknown} (known: {', '.join(SCORE_NAMES)})")
    curves = {"deletion": "zero", "insertion": "blur"}  # RISE's substrates
    wanted = {k: v for k, v in curves.items() if f"{k}_auc" in which}
    aucs: dict[str, np.ndarray] = {}
    if wanted:
        aucs = _auc(
            forward, images, maps, targets, wanted, steps=steps, chunk_size=chunk_size, check=check
        )
    fidelity = None
    if "mu_fidelity" in which:
        fidelity = mu_fidelity(
            forward,
            images,
            maps,
            targets,
            n_subsets=n_subsets,
            seed=seed,
            chunk_size=chunk_size,
            check=check,
        )
    scores = FaithfulnessScores(
        deletion_auc=aucs.get("deletion"),
        insertion_auc=aucs.get("insertion"),
        mu_fidelity=fidelity,
    )
    return scores.as_dict()
