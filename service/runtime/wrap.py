"""Wrap a classifier so that it takes pixels in ``[0, 1]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """Pixel-space view of a model trained on normalised inputs.

    Explanations are taken with respect to the pixels a client sent, so the normalisation
    lives inside the graph (and inside the exported artifacts) rather than in the caller.

    Args:
        model: classifier taking ``(x - mean) / std``; kept as the attribute ``model`` so
            that layer names read ``model.<name>``.
        mean: per-channel mean, in ``[0, 1]`` pixel units.
        std: per-channel standard deviation, in ``[0, 1]`` pixel units.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of pixels ``x``: float32 ``(N, C, H, W)`` in ``[0, 1]``."""
        return self.model((x - self.mean) / self.std)
