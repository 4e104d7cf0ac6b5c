"""Concept factorisation: non-negative activations ``A ~= U W`` (Fel et al. 2023, sec. 3.1).

CRAFT learns a class's concept bank ``W`` (``k x channels``) by non-negative matrix
factorisation of the activations of random crops of that class, and later reads an image
in those concepts by solving for ``U >= 0`` with ``W`` fixed. Both halves live here so
that the loss they minimise is the same one (squared Frobenius error).

Paper: https://arxiv.org/abs/2211.10154
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import nnls
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

NMF_INIT = "nndsvda"
"""Deterministic SVD-based start (no random draw), zeros filled with the mean: two fits of
the same activations give the same bank whatever the seed's role elsewhere."""
NMF_MAX_ITER = 500


def fit_concepts(activations: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Factorise non-negative activations into ``k`` concepts.

    Args:
        activations: ``(n, channels)`` float, every entry ``>= 0`` (one row per crop).
        k: number of concepts; at most ``min(n, channels)``.
        seed: scikit-learn's ``random_state`` (the coordinate-descent solver's order).

    Returns:
        ``(U, W)``: float64 coefficients ``(n, k)`` and concept bank ``(k, channels)``,
        both non-negative, ``U @ W ~= activations``.

    Raises:
        ValueError: negative activations or ``k`` out of range.
    """
    data = np.asarray(activations, dtype=np.float64)
    if data.ndim != 2 or (data < 0).any():
        raise ValueError("activations must be a non-negative (n, channels) matrix")
    if not 1 <= k <= min(data.shape):
        raise ValueError(f"k must be in [1, {min(data.shape)}] for {data.shape} activations")
    nmf = NMF(n_components=k, init=NMF_INIT, solver="cd", max_iter=NMF_MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        # The iteration cap bounds the archive's build time on purpose; the fit's quality
        # is what the tests and bench/concepts.py measure, not the solver's tolerance.
        warnings.simplefilter("ignore", ConvergenceWarning)
        u = nmf.fit_transform(data)
    return u, np.asarray(nmf.components_, dtype=np.float64)


def project(activations: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Coefficients ``U >= 0`` minimising ``||activations - U bank||`` row by row.

    Exact non-negative least squares (Lawson-Hanson) per row rather than NMF's iterative
    ``transform``: ``k`` is small, rows are few (one per spatial cell), and the answer
    then does not depend on a solver's stopping rule.

    Args:
        activations: ``(m, channels)``, non-negative.
        bank: ``(k, channels)`` concept bank ``W``.

    Returns:
        float64 ``(m, k)``.
    """
    data = np.asarray(activations, dtype=np.float64)
    basis = np.asarray(bank, dtype=np.float64).T  # (channels, k)
    out = np.empty((data.shape[0], basis.shape[1]))
    for row in range(data.shape[0]):
        out[row], _ = nnls(basis, data[row])
    return out
