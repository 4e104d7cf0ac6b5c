"""Which concepts make a prediction: Sobol total indices over concept coefficients.

An image's activations ``A`` (``h x w x channels``) at the bank's layer are read in a
class's concepts by non-negative least squares, ``A ~= U W`` (``U``: ``h x w x k``). Each
concept's coefficient map is then scaled by a quasi-Monte Carlo variable ``m_i`` in
``[0, 1]``, the activations rebuilt as ``(U * m) W`` (without the residual ``A - U W``, as
CRAFT does), the rest of the network run from the layer, and Jansen's estimator gives each
concept's total-order index of the target logit (Fel et al. 2023, sec. 3.2). The design
and the estimator are Sobol attribution's own (:mod:`service.engine.methods.sobol`).

"The rest of the network" is run by a forward hook that *replaces* the layer's output
with the rebuilt activations (:func:`replaced_output`); it works for any model whose layer
runs once per forward, and it is removed on every path.

Paper: https://arxiv.org/abs/2211.10154
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from service.engine.concepts.factorize import project
from service.engine.layers import capture_activations
from service.engine.methods.sobol import jansen_total_order, sobol_design
from service.protocol.cost import Cost
from service.protocol.errors import UnsupportedMethodError

Score = Callable[[np.ndarray], np.ndarray]
"""Rebuilt activations ``(b, channels, h, w)`` float32 -> the target's logit ``(b,)``."""
Check = Callable[[], None]
DEFAULT_DESIGNS = 32


@dataclass(frozen=True)
class ConceptAttribution:
    """One concept's part in one prediction.

    Attributes:
        concept: index in the class's bank.
        importance: Sobol total-order index of the target logit.
        map: float32 ``(H, W)``, the concept's coefficient map upsampled to the input.
    """

    concept: int
    importance: float
    map: np.ndarray


def importance_cost(k: int, n_designs: int, input_shape: tuple[int, int, int]) -> Cost:
    """``n_designs * (k + 2)`` forwards per target; the design and one rebuilt batch."""
    _, height, width = input_shape
    design = 4 * n_designs * k * (k + 2)
    return Cost(forwards=n_designs * (k + 2), memory_bytes=design + 8 * k * height * width)


@contextmanager
def replaced_output(layer: nn.Module, replacement: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``layer`` returns ``replacement`` (to forwards of this thread).

    Raises:
        UnsupportedMethodError: (from the forward) the layer's output is not a tensor of
            ``replacement``'s shape.
    """
    owner = threading.get_ident()

    def hook(_module: nn.Module, _args: object, output: object) -> object:
        if threading.get_ident() != owner:
            return None
        if not isinstance(output, torch.Tensor) or output.shape != replacement.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise UnsupportedMethodError(
                f"concept layer output {shape} cannot be replaced by {tuple(replacement.shape)}"
            )
        return replacement

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_activations(model: nn.Module, layer: nn.Module, image: torch.Tensor) -> np.ndarray:
    """``layer``'s output for one image ``(1, C, H, W)`` as non-negative ``(h, w, channels)``."""
    with capture_activations(layer) as capture:
        model(image)
    out = capture.single()
    if out.dim() != 4:
        raise UnsupportedMethodError(
            f"concepts need a spatial (N, C, h, w) layer; this one outputs {tuple(out.shape)}"
        )
    return out[0].clamp_min(0).permute(1, 2, 0).double().cpu().numpy()


def model_score(model: nn.Module, layer: nn.Module, image: torch.Tensor, target: int) -> Score:
    """The target logit of ``model`` on ``image`` with ``layer``'s output replaced."""

    @torch.no_grad()
    def score(activations: np.ndarray) -> np.ndarray:
        rebuilt = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32))
        rebuilt = rebuilt.to(image.device)
        with replaced_output(layer, rebuilt):
            logits = model(image.expand(rebuilt.shape[0], -1, -1, -1))
        return logits[:, target].double().cpu().numpy()

    return score


def concept_importance(
    coefficients: np.ndarray,
    bank: np.ndarray,
    score: Score,
    *,
    n_designs: int = DEFAULT_DESIGNS,
    seed: int = 0,
    chunk_size: int = 32,
    check: Check | None = None,
) -> np.ndarray:
    """Sobol total-order index of each concept.

    Args:
        coefficients: ``U``, ``(h, w, k)`` non-negative.
        bank: ``W``, ``(k, channels)``.
        score: rebuilt activations ``(b, channels, h, w)`` -> target logit ``(b,)``.
        n_designs: points of each quasi-Monte Carlo matrix (a power of two).
        seed: scrambling seed of the Sobol sequence.
        chunk_size: design rows per call of ``score``.
        check: called between chunks (deadline, cancellation).

    Returns:
        float64 ``(k,)``; zeros when the logit does not vary under the design.
    """
    k = bank.shape[0]
    design = sobol_design(k, n_designs, seed)  # (n_designs * (k + 2), k)
    outputs = np.empty(design.shape[0])
    for start in range(0, design.shape[0], chunk_size):
        if check is not None:
            check()
        masks = design[start : start + chunk_size].astype(np.float64)
        perturbed = coefficients[None] * masks[:, None, None, :]  # (b, h, w, k)
        rebuilt = (perturbed @ bank).transpose(0, 3, 1, 2)  # (b, channels, h, w)
        outputs[start : start + masks.shape[0]] = score(rebuilt)
    return jansen_total_order(outputs, n_designs, k)


def explain_concepts(
    model: nn.Module,
    layer: nn.Module,
    image: torch.Tensor,
    target: int,
    bank: np.ndarray,
    *,
    top: int,
    n_designs: int = DEFAULT_DESIGNS,
    seed: int = 0,
    chunk_size: int = 32,
    check: Check | None = None,
) -> list[ConceptAttribution]:
    """The ``top`` most important concepts of ``target`` on one image, with their maps.

    Args:
        model: pixel-space model; ``layer`` is one of its modules.
        image: ``(1, C, H, W)`` pixels in ``[0, 1]``.
        target: the class explained; ``bank`` is its concepts ``W`` ``(k, channels)``.
        top: concepts returned, most important first (ties: lower index first).
        n_designs, seed, chunk_size, check: see :func:`concept_importance`.

    Returns:
        Up to ``top`` :class:`ConceptAttribution`.
    """
    activations = layer_activations(model, layer, image)
    h, w, channels = activations.shape
    if bank.shape[1] != channels:
        raise UnsupportedMethodError(
            f"the concept bank has {bank.shape[1]} channels, the layer outputs {channels}"
        )
    coefficients = project(activations.reshape(-1, channels), bank).reshape(h, w, -1)
    score = model_score(model, layer, image, target)
    importance = concept_importance(
        coefficients, bank.astype(np.float64), score,
        n_designs=n_designs, seed=seed, chunk_size=chunk_size, check=check,
    )  # fmt: skip
    order = np.argsort(-importance, kind="stable")[:top]
    height, width = image.shape[2:]
    return [
        ConceptAttribution(
            int(i), float(importance[i]), _upsampled(coefficients[..., i], height, width)
        )
        for i in order
    ]


def _upsampled(coefficient: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear, as the CAM maps are: one cell of the layer spreads over its pixels."""
    return cv2.resize(
        coefficient.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
