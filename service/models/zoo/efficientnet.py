"""EfficientNet-B0 (Tan & Le 2019, https://arxiv.org/abs/1905.11946) in plain torch.

Module names and shapes follow ``torchvision.models.efficientnet_b0``: ``features.0`` (stem),
``features.1`` ... ``features.7`` (stages of MBConv blocks, each with ``block`` and
``stochastic_depth``), ``features.8`` (1x1 head convolution), ``avgpool``, ``classifier``.
Two details come from other common EfficientNet code, because users' models have them:

* TensorFlow "same" padding (timm's ``tf_`` models): strided convolutions pad
  asymmetrically, by what the input size needs, as TensorFlow computes it;
* **one activation module instance** shared by every block (as in EfficientNet-PyTorch's
  ``_swish``), so a hook on it fires dozens of times per forward.

``act="hardswish"`` gives the MobileNetV3 flavour (Howard et al. 2019,
https://arxiv.org/abs/1905.02244): hard-swish activations, hard-sigmoid squeeze-excite gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from service.models.zoo.common import Classifier, ImageSize, Size, build_seeded, shrink_

Activation = Literal["silu", "hardswish"]
RESIDUAL_GAIN = 0.2  # scale of each residual block's projection batch norm


@dataclass(frozen=True)
class StageConfig:
    """One stage: ``layers`` MBConv blocks with these settings (the first one strided)."""

    expand: int
    kernel: int
    stride: int
    c_in: int
    c_out: int
    layers: int


B0_STAGES = (
    StageConfig(1, 3, 1, 32, 16, 1),
    StageConfig(6, 3, 2, 16, 24, 2),
    StageConfig(6, 5, 2, 24, 40, 2),
    StageConfig(6, 3, 2, 40, 80, 3),
    StageConfig(6, 5, 1, 80, 112, 3),
    StageConfig(6, 5, 2, 112, 192, 4),
    StageConfig(6, 3, 1, 192, 320, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor``, never below 90% of ``value`` (TF rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow's "same" padding: ``ceil(in / stride)`` outputs.

    The total padding ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)`` is split with
    the extra pixel on the bottom/right, as TensorFlow does, and computed from the input's
    size at run time (static under ``torch.export``: only the batch axis is dynamic).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(
            reversed(x.shape[-2:]),
            reversed(self.kernel_size),
            reversed(self.stride),
            reversed(self.dilation),
            strict=True,
        ):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # At stride 1 "same" is symmetric (k // 2 each side): a plain convolution, as timm does.
    if stride == 1:
        return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False)
    return Conv2dSame(c_in, c_out, kernel, stride=stride, groups=groups, bias=False)


def conv_norm_act(
    c_in: int, c_out: int, kernel: int, act: nn.Module | None, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: convolution, batch norm, the (shared) activation."""
    layers: list[nn.Module] = [_conv(c_in, c_out, kernel, stride, groups), nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gates from globally pooled features (Hu et al. 2018, arXiv:1709.01507)."""

    def __init__(self, channels: int, squeeze: int, act: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act
        self.scale_activation = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, squeeze-excite, 1x1 project (+ skip)."""

    def __init__(
        self, cfg: StageConfig, c_in: int, stride: int, act: nn.Module, gate: type[nn.Module]
    ) -> None:
        super().__init__()
        expanded = make_divisible(c_in * cfg.expand)
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(conv_norm_act(c_in, expanded, 1, act))
        layers.append(conv_norm_act(expanded, expanded, cfg.kernel, act, stride, expanded))
        layers.append(SqueezeExcitation(expanded, max(1, c_in // 4), act, gate()))
        layers.append(conv_norm_act(expanded, cfg.c_out, 1, None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = nn.Identity()  # stochastic depth is off at inference
        self.use_res_connect = stride == 1 and c_in == cfg.c_out

    def project_norm(self) -> nn.Module:
        """The batch norm after the 1x1 projection: the residual branch's last layer."""
        project = self.block[-1]
        assert isinstance(project, nn.Sequential)
        return project[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x  # in place, as torchvision does
        return result


class EfficientNet(Classifier):
    """EfficientNet for ``(N, 3, H, W)`` normalised images.

    Args:
        stages: the MBConv stages (channels before the width multiplier).
        width: width multiplier applied to every channel count.
        depth: blocks per stage replace ``StageConfig.layers`` when given.
        num_classes: logits.
        act: ``"silu"`` (EfficientNet) or ``"hardswish"`` (MobileNetV3 flavour).
    """

    def __init__(
        self,
        stages: tuple[StageConfig, ...],
        width: float,
        depth: int | None,
        num_classes: int,
        act: Activation = "silu",
    ) -> None:
        super().__init__()
        shared: nn.Module = nn.SiLU() if act == "silu" else nn.Hardswish()
        gate = nn.Sigmoid if act == "silu" else nn.Hardsigmoid
        c_in = make_divisible(stages[0].c_in * width)
        features: list[nn.Module] = [conv_norm_act(3, c_in, 3, shared, stride=2)]
        for cfg in stages:
            c_out = make_divisible(cfg.c_out * width)
            scaled = StageConfig(cfg.expand, cfg.kernel, cfg.stride, c_in, c_out, cfg.layers)
            blocks = [
                MBConv(scaled, c_in if i == 0 else c_out, cfg.stride if i == 0 else 1, shared, gate)
                for i in range(depth or cfg.layers)
            ]
            features.append(nn.Sequential(*blocks))
            c_in = c_out
        self.num_features = 4 * c_in
        features.append(conv_norm_act(c_in, self.num_features, 1, shared))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(0.2, inplace=True), nn.Linear(self.num_features, num_classes)
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(N, C, ceil(H/32), ceil(W/32))``."""
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a feature map: global average pool, dropout (off in eval), linear."""
        return self.classifier(torch.flatten(self.avgpool(features), 1))


def build(
    size: Size = "tiny",
    num_classes: int = 1000,
    image_size: ImageSize = 224,
    seed: int = 0,
    act: Activation = "silu",
) -> EfficientNet:
    """EfficientNet-B0 (5.3M parameters at 1000 classes), or its tiny version.

    Args:
        size: ``"full"`` as published; ``"tiny"`` at width x0.25, one block per stage.
        num_classes: logits.
        image_size: unused ("same" padding takes any size); kept for a uniform builder.
        seed: seeds every weight and batch-norm statistic.
        act: ``"silu"``, or ``"hardswish"`` with hard-sigmoid gates (MobileNetV3 style).
    """
    del image_size
    width, depth = (1.0, None) if size == "full" else (0.25, 1)
    model = build_seeded(lambda: EfficientNet(B0_STAGES, width, depth, num_classes, act), seed)
    for module in model.modules():
        if isinstance(module, MBConv) and module.use_res_connect:
            shrink_(module.project_norm(), RESIDUAL_GAIN)
    return model
