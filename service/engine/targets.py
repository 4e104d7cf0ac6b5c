"""What to explain: target classes, kept apart from how to explain them."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from service.protocol.errors import InvalidInputError, TargetOutOfRangeError

TargetSpec = Sequence[int | None] | torch.Tensor | None
"""One entry per item: a class index, or ``None`` for the predicted class; ``None`` for all."""


def check_target_range(targets: Iterable[int] | np.ndarray, num_classes: int) -> None:
    """``TargetOutOfRangeError`` unless every target indexes one of ``num_classes`` classes.

    The one range check: the pipeline runs it before any work, the engine on what a
    library caller passes, the forward-only methods on every chunk's logits.
    """
    try:
        values = np.asarray(targets, dtype=np.int64).reshape(-1)
    except OverflowError:  # beyond int64: out of any model's range
        raise TargetOutOfRangeError(
            f"a target class is out of range: the model has {num_classes} classes "
            f"(0..{num_classes - 1})"
        ) from None
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise TargetOutOfRangeError(
            f"target class {int(bad[0])} is out of range: the model has {num_classes} "
            f"classes (0..{num_classes - 1})"
        )


def resolve_targets(logits: torch.Tensor, requested: TargetSpec = None) -> torch.Tensor:
    """Class index to explain for each item of a batch.

    ``None`` (for the whole batch or one item) means the model's predicted class, the
    argmax of the logits -- never class 0 by default.

    Args:
        logits: ``(B, K)`` model outputs for the batch.
        requested: ``None``, or ``B`` entries each an ``int`` in ``[0, K)`` or ``None``;
            a tensor must hold ``B`` integers.

    Returns:
        int64 tensor ``(B,)`` on the logits' device.

    Raises:
        InvalidInputError: wrong number of entries or a non-integer entry.
        TargetOutOfRangeError: an index outside ``[0, K)``; the message gives the range.
    """
    if logits.dim() != 2:
        raise InvalidInputError(f"logits must be (batch, classes), got {tuple(logits.shape)}")
    batch, num_classes = logits.shape
    predicted = logits.detach().argmax(dim=1)
    if requested is None:
        return predicted.to(torch.int64)
    if isinstance(requested, torch.Tensor):
        if requested.is_floating_point() or requested.is_complex():
            raise InvalidInputError(f"targets must be integers, got dtype {requested.dtype}")
        entries: list[int | None] = [int(t) for t in requested.reshape(-1).tolist()]
    else:
        entries = list(requested)
    if len(entries) != batch:
        raise InvalidInputError(f"got {len(entries)} targets for a batch of {batch} inputs")
    out = predicted.clone().to(torch.int64)
    for i, target in enumerate(entries):
        if target is None:
            continue
        try:
            if isinstance(target, bool):
                raise TypeError
            index = operator.index(target)  # int and numpy integers, not floats
        except TypeError:
            raise InvalidInputError(f"target {i} must be an int or None, got {target!r}") from None
        check_target_range([index], num_classes)
        out[i] = index
    return out


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable classes per item, most probable first.

    Args:
        logits: ``(B, K)`` model outputs.
        k: how many classes; clipped to ``K``; must be at least 1.

    Returns:
        ``(indices, probabilities)``, each ``(B, min(k, K))``: int64 class indices and their
        softmax probabilities (float32).
    """
    if k < 1:
        raise InvalidInputError(f"top_k must be at least 1, got {k}")
    probs = torch.softmax(logits.detach().to(torch.float32), dim=1)
    values, indices = probs.topk(min(k, logits.shape[1]), dim=1)
    return indices.to(torch.int64), values
