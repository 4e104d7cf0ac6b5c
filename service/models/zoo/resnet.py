"""ResNet-18 and ResNet-50 (He et al. 2016, https://arxiv.org/abs/1512.03385) in plain torch.

Same modules, names and shapes as ``torchvision.models.resnet18`` / ``resnet50`` (the
bottleneck's stride on its 3x3 convolution, "ResNet v1.5"): ``conv1``, ``bn1``, ``relu``,
``maxpool``, ``layer1`` ... ``layer4``, ``avgpool``, ``fc``, so torchvision checkpoints load
with ``load_state_dict`` and Grad-CAM's usual ``layer4`` exists. Each block calls its one
``relu`` module two or three times, as torchvision's does: the CAM layer finder has to cope.
"""

from __future__ import annotations

import torch
from torch import nn

from service.models.zoo.common import Classifier, ImageSize, Size, build_seeded, shrink_

RESIDUAL_GAIN = 0.2  # scale of each block's last batch norm (see common.shrink_)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(c_in, planes, stride)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with batch norm and a residual (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, planes * 4, stride)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
    )


class ResNet(Classifier):
    """ResNet for ``(N, 3, H, W)`` normalised images (any size of at least 32 px).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage.
        width: channels of the stem and of the first stage's ``planes`` (64 in the paper).
        num_classes: logits.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        width: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = width
        stages = []
        for index, depth in enumerate(layers):
            planes = width * 2**index
            blocks = []
            for position in range(depth):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(c_in, planes, stride))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.num_features = c_in

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(N, C, H/32, W/32)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a feature map: global average pool, then ``fc``."""
        return self.fc(torch.flatten(self.avgpool(features), 1))


def _resnet(
    block: type[BasicBlock | Bottleneck],
    layers: tuple[int, int, int, int],
    size: Size,
    num_classes: int,
    seed: int,
) -> ResNet:
    # tiny: one block per stage at width 8, the same block type and downsampling
    depths, width = (layers, 64) if size == "full" else ((1, 1, 1, 1), 8)
    model = build_seeded(lambda: ResNet(block, depths, width, num_classes), seed)
    for module in model.modules():
        if isinstance(module, BasicBlock | Bottleneck):
            shrink_(module.last_norm(), RESIDUAL_GAIN)
    return model


def build(
    size: Size = "tiny", num_classes: int = 1000, image_size: ImageSize = 224, seed: int = 0
) -> ResNet:
    """ResNet-50: bottlenecks ``[3, 4, 6, 3]``, width 64 (25.6M parameters at 1000 classes).

    Args:
        size: ``"full"`` as published; ``"tiny"`` one bottleneck per stage at width 8.
        num_classes: logits.
        image_size: unused (global pooling takes any size); kept for a uniform builder.
        seed: seeds every weight and batch-norm statistic.
    """
    del image_size
    return _resnet(Bottleneck, (3, 4, 6, 3), size, num_classes, seed)


def build_resnet18(
    size: Size = "tiny", num_classes: int = 1000, image_size: ImageSize = 224, seed: int = 0
) -> ResNet:
    """ResNet-18: basic blocks ``[2, 2, 2, 2]``, width 64 (11.7M parameters); as :func:`build`."""
    del image_size
    return _resnet(BasicBlock, (2, 2, 2, 2), size, num_classes, seed)
