"""ResNet-18 layout in plain torch (torchvision does not import here), for speed benchmarks.

Same layers, shapes and FLOPs as ``torchvision.models.resnet18`` (BasicBlock, [2, 2, 2, 2],
batch norm after every convolution, 1x1 strided projections): timings on it are timings of
ResNet-18. Weights are random; a speed benchmark does not need trained ones. Batch-norm
running statistics are randomised as well, so that folding them into the convolutions is
not a no-op that a benchmark could win by accident.
"""

from __future__ import annotations

import torch
from torch import nn

from service.runtime.optimize.batchnorm_fold import randomize_batch_norm

TARGET_LAYER = "model.layer4"
"""Grad-CAM layer inside the pixel-space wrapper (``service.runtime.wrap.Normalized``)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) for ``(N, 3, H, W)`` normalised images.

    Args:
        num_classes: logits (1000 as ImageNet by default).
        seed: seeds the random weights and batch-norm statistics.
    """

    def __init__(self, num_classes: int = 1000, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
            self.fc.weight.normal_(0.0, 0.01, generator=gen)
            self.fc.bias.zero_()
        randomize_batch_norm(self, seed=seed + 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_pixels(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """ResNet-18 in pixel space (ImageNet normalisation inside), eval mode, as served."""
    from service.runtime.wrap import Normalized

    return Normalized(ResNet18(num_classes, seed), IMAGENET_MEAN, IMAGENET_STD).eval()
