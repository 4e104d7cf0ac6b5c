"""What every score shares: the call's context, input checks, and ``compute_scores``.

Every score runs batched forwards of ``chunk_size`` and calls ``check`` (e.g.
``ExplainContext.check_deadline``) before each chunk, so a passed deadline raises before
any score is returned. A score that re-runs the explanation method (``reexplains``,
stability) gets it from the host as an :data:`Explainer`, already bound to the method, its
parameters and the request's seed: the engine's scores never import the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.engine.perturb import Check
from service.engine.registry import SCORES, ResolvedParams
from service.engine.types import NumpyForward
from service.protocol.errors import InvalidInputError, UnsupportedMethodError

Explainer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""The scored method, bound by the host: float32 images ``(N, C, H, W)`` in ``[0, 1]`` and
int64 targets ``(N,)`` -> maps ``(N, H, W)``, stopping (raising) when the call stops."""


@dataclass
class ScoreContext:
    """One ``compute_scores`` call, as its scores see it.

    Attributes:
        forward: ``(N, C, H, W) -> (N, K)`` logits.
        chunk_size: perturbed images per forward.
        check: called before every forward; raises to stop (deadline, cancellation).
        seed: seed of every random draw of the call.
        requested: every score of the call with its parameters, so that scores which can
            share a pass (deletion and insertion) do.
        memo: results of shared passes, for this call only.
        explain: the scored method, for the scores that re-run it; ``None`` otherwise.
    """

    forward: NumpyForward
    chunk_size: int = 32
    check: Check | None = None
    seed: int = 0
    requested: Mapping[str, ResolvedParams] = field(default_factory=dict)
    memo: dict[object, object] = field(default_factory=dict)
    explain: Explainer | None = None


def check_inputs(
    images: np.ndarray, maps: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 images ``(N, C, H, W)``, float64 maps ``(N, H, W)``, int64 targets ``(N,)``."""
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


def compute_scores(
    forward: NumpyForward,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    which: Sequence[str],
    *,
    seed: int = 0,
    chunk_size: int = 32,
    check: Check | None = None,
    params: Mapping[str, Mapping[str, object]] | None = None,
    explain: Explainer | None = None,
    **shared: object,
) -> dict[str, np.ndarray]:
    """The requested scores of one batch of maps, keyed by registered name.

    Args:
        forward: ``(N, C, H, W) -> (N, K)`` logits.
        images: float32 ``(N, C, H, W)`` pixels in ``[0, 1]``.
        maps: ``(N, H, W)`` saliency, larger = more important.
        targets: ``(N,)`` class per image.
        which: registered score names; scores that can share a pass do.
        seed: seed of every random draw (MuFidelity's subsets).
        chunk_size: perturbed images per forward.
        check: called before every forward; raises to stop (deadline).
        params: per-score parameter overrides, ``{"mu_fidelity": {"n_subsets": 64}}``.
        explain: the method that made ``maps``, bound to its parameters and seed; needed
            by the scores that re-run it (``reexplains``), ignored by the others.
        **shared: overrides applied to every requested score that declares the parameter
            (``steps=8`` sets both curves' resolution); a name no score declares is refused.

    Returns:
        ``{name: float64 (N,)}`` for each requested name, nothing else.
    """
    specs = [SCORES.get(name) for name in dict.fromkeys(which)]
    declared = {p.name for spec in SCORES.members() for p in spec.params}
    if unknown := sorted(set(shared) - declared):
        raise InvalidInputError(f"no score has the parameter(s) {unknown}")
    requested: dict[str, ResolvedParams] = {}
    for spec in specs:
        overrides = {k: v for k, v in shared.items() if k in spec.params.names()}
        overrides.update((params or {}).get(spec.name, {}))
        requested[spec.name] = spec.resolve_params(overrides)
        if spec.reexplains is not None and explain is None:
            raise UnsupportedMethodError(
                f"score {spec.name!r} re-runs the explanation method; none was given"
            )
    if not specs:
        return {}
    images, maps, targets = check_inputs(images, maps, targets)
    if chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be >= 1, got {chunk_size}")
    ctx = ScoreContext(forward, chunk_size, check, seed, requested, explain=explain)
    return {
        spec.name: np.asarray(spec.fn(ctx, images, maps, targets, **requested[spec.name]))
        for spec in specs
    }
