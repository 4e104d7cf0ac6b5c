"""A small conv classifier the ONNX Runtime tests share (seeded: the same on every run)."""

from __future__ import annotations

import torch


def tiny_classifier() -> torch.nn.Sequential:
    """3 channels in, 5 logits out, any image size."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 5),
    ).eval()
