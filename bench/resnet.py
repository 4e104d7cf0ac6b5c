"""ResNet-18 for speed benchmarks: the zoo's (``service.models.zoo.resnet``) at full size.

Same layers, shapes and FLOPs as ``torchvision.models.resnet18``: timings on it are timings
of ResNet-18. Weights are random (a speed benchmark does not need trained ones), batch-norm
running statistics too, so that folding them into the convolutions is not a no-op that a
benchmark could win by accident.
"""

from __future__ import annotations

from torch import nn

from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD
from service.models.zoo.resnet import build_resnet18

TARGET_LAYER = "model.layer4"
"""Grad-CAM layer inside the pixel-space wrapper (``service.runtime.wrap.Normalized``)."""


def resnet18_pixels(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """ResNet-18 in pixel space (ImageNet normalisation inside), eval mode, as served."""
    from service.runtime.wrap import Normalized

    net = build_resnet18("full", num_classes, 224, seed)
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval()
