"""A class-discriminative check that needs no trained weights: each class reads one image half.

:class:`TwoHalves` turns any zoo backbone into a two-class model whose class 0 logit is a
function of the image's left half only and class 1 of the right half only -- exactly, not
approximately. A deep CNN's receptive field spans the whole image, so masking one half of
its final feature map would not do; instead the two half-images go through the backbone
as separate items of one batch (in eval mode every item is computed on its own: batch
norm uses running statistics, layer norm and attention work per item), and only then are
their feature maps put side by side. Class 0 then reads the left half of that map and
class 1 the right, through positive weights on softplus features.

An explanation of class ``t`` is class-discriminative when its map puts its maximum and
most of its positive mass on the half class ``t`` reads (:func:`half_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.cam_layer import tokens_to_map
from service.engine.engine import Engine
from service.engine.layer_finder import find_cam_layer
from service.engine.modules import freeze
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO, Classifier
from service.runtime.wrap import Normalized
from tests.engine.zoo_cases import auto_engine, torch_forward

SIZE = 64  # image side; each half is SIZE x SIZE/2
PATCH = 8  # the tiny ViTs' patch
READS = ("left", "right")  # the half class 0 and class 1 read


class HalfMasks(nn.Module):
    """``(N, C, h, w)`` -> ``(N, 2C, h, w)``: softplus features, left half then right half.

    Channels ``[0, C)`` keep the left half of the grid and are zero on the right; channels
    ``[C, 2C)`` the other way round. This is the CAM layer: a class's channels are exactly
    zero on the other half, and strictly positive on its own.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        positive = F.softplus(features)
        half = features.shape[-1] // 2
        zeros = torch.zeros_like(positive[..., half:])
        left = torch.cat([positive[..., :half], zeros], dim=-1)
        right = torch.cat([torch.zeros_like(positive[..., :half]), positive[..., half:]], dim=-1)
        return torch.cat([left, right], dim=1)


class TwoHalves(nn.Module):
    """Two classes over a zoo backbone: class 0 sees the left image half, class 1 the right.

    Args:
        backbone: a zoo model (``forward_features``) built for ``(SIZE, SIZE // 2)`` inputs.
        seed: seeds the head's positive weights.
    """

    def __init__(self, backbone: Classifier, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.halves = HalfMasks()
        self.pool = nn.AdaptiveAvgPool2d(1)
        channels = backbone.num_features
        self.head = nn.Linear(2 * channels, 2, bias=False)
        gen = torch.Generator().manual_seed(seed)
        weight = torch.zeros(2, 2 * channels)
        weight[0, :channels] = torch.rand(channels, generator=gen) + 0.5
        weight[1, channels:] = torch.rand(channels, generator=gen) + 0.5
        with torch.no_grad():
            self.head.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, width = x.shape[0], x.shape[-1]
        both = torch.cat([x[..., : width // 2], x[..., width // 2 :]], dim=0)
        features = self.backbone.forward_features(both)
        if features.dim() == 3:  # ViT tokens: the patch grid of one half-image
            prefix = int(self.backbone.num_prefix_tokens)
            grid = (x.shape[-2] // PATCH, width // 2 // PATCH)
            features = tokens_to_map(features, grid, prefix)
        side_by_side = torch.cat([features[:n], features[n:]], dim=-1)
        return self.head(self.pool(self.halves(side_by_side)).flatten(1))


def two_halves_engine(name: str, seed: int = 0) -> Engine:
    """An engine over ``TwoHalves`` on the tiny zoo model ``name``, CAM layer found for it;
    forward-only methods run on the torch model."""
    backbone = ZOO[name]("tiny", 1, (SIZE, SIZE // 2), seed)
    model = freeze(Normalized(TwoHalves(backbone, seed), IMAGENET_MEAN, IMAGENET_STD))
    layer = find_cam_layer(model, (3, SIZE, SIZE))
    return Engine(
        model,
        target_layer=layer.name,
        attention="auto",  # none: each image runs as two sequences (the reason says so)
        input_shape=(3, SIZE, SIZE),
        forward_numpy=torch_forward(model),  # type: ignore[arg-type]
    )


class TwoHalvesViT(nn.Module):
    """Two classes over a zoo ViT that sees the whole image as one sequence, its attention
    masked so that each half's tokens attend only to their own group.

    Groups: the left patches with class 0's readout, the right patches with class 1's. The
    class-token ViT (``vit_s16``) gets a class token per group (prefix 2) and class ``t``
    reads its own class token; the average-pooled ViT (``vit_s16_sdpa_reg4``) keeps its
    class and register tokens as a third group that attends only to itself (they carry
    no pixel), and class ``t`` reads the mean of its half's patch tokens. A group closed
    under attention computes from its own inputs alone, so class 0's logit is exactly a
    function of the left half, class 1's of the right -- and the attention methods see one
    image, one sequence, as in any served ViT.
    """

    def __init__(self, backbone: Classifier, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        grid = backbone.patch_embed.grid  # type: ignore[union-attr]
        self.class_tokens = not hasattr(backbone, "reg_token")  # vit_s16: the head reads it
        prefix = 2 if self.class_tokens else int(backbone.num_prefix_tokens)
        columns = torch.arange(grid[0] * grid[1]) % grid[1]
        patch_group = (columns >= grid[1] // 2).long()
        prefix_group = torch.tensor([0, 1]) if self.class_tokens else torch.full((prefix,), 2)
        group = torch.cat([prefix_group, patch_group])
        mask = torch.zeros(len(group), len(group))
        mask[group[:, None] != group[None, :]] = float("-inf")
        self.register_buffer("mask", mask)
        self.register_buffer("patch_group", patch_group)
        self.prefix = prefix
        self.head = nn.Linear(backbone.num_features, 2)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        patches = net.patch_embed(x)  # type: ignore[operator]
        if self.class_tokens:  # vit_s16: nn.TransformerEncoderLayer, (T, N, D)
            cls = net.cls_token.expand(len(x), 2, -1) + net.pos_embed[:, :1]  # type: ignore[union-attr, index]
            t = torch.cat([cls, patches + net.pos_embed[:, 1:]], dim=1)  # type: ignore[index]
            t = t.transpose(0, 1)
            for block in net.blocks:  # type: ignore[union-attr]
                t = block(t, src_mask=self.mask)
            t = net.norm(t.transpose(0, 1))  # type: ignore[operator]
            read = [t[:, 0], t[:, 1]]
        else:  # vit_s16_sdpa_reg4: SDPA blocks, (N, T, D), average-pooled head
            prefix = [net.cls_token.expand(len(x), -1, -1), net.reg_token.expand(len(x), -1, -1)]  # type: ignore[union-attr]
            t = torch.cat([*prefix, patches + net.pos_embed], dim=1)  # type: ignore[operator]
            for block in net.blocks:  # type: ignore[union-attr]
                t = block(t, self.mask)
            patch_tokens = t[:, self.prefix :]
            read = [
                net.fc_norm(patch_tokens[:, self.patch_group == side].mean(dim=1))  # type: ignore[operator]
                for side in (0, 1)
            ]
        logits = [self.head(read[side])[:, side] for side in (0, 1)]
        return torch.stack(logits, dim=1)


def two_halves_vit_engine(name: str, seed: int = 0) -> Engine:
    """An engine over ``TwoHalvesViT`` on the tiny zoo ViT ``name``, CAM layer and attention
    found for it; forward-only methods run on the torch model."""
    backbone = ZOO[name]("tiny", 1, SIZE, seed)
    return auto_engine(
        freeze(Normalized(TwoHalvesViT(backbone, seed), IMAGENET_MEAN, IMAGENET_STD))
    )


@dataclass(frozen=True)
class HalfScore:
    """Where one map puts its weight, relative to the half its class reads."""

    own_fraction: float  # share of the positive mass on the class's own half
    own_max: float  # largest value on the class's own half
    other_max: float  # largest value on the other half


def half_scores(maps: torch.Tensor, target: int) -> list[HalfScore]:
    """Per map of ``(B, H, W)``: positive mass share and maxima on class ``target``'s half."""
    half = maps.shape[-1] // 2
    own, other = (maps[..., :half], maps[..., half:])
    if READS[target] == "right":
        own, other = other, own
    scores = []
    for own_map, other_map in zip(own.double(), other.double(), strict=True):
        own_mass = float(own_map.clamp(min=0).sum())
        total = own_mass + float(other_map.clamp(min=0).sum())
        fraction = own_mass / total if total > 0 else 0.0
        scores.append(HalfScore(fraction, float(own_map.max()), float(other_map.max())))
    return scores
