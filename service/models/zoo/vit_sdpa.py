"""A timm-style ViT whose attention is ``F.scaled_dot_product_attention``, with register tokens.

Module names follow timm's ``VisionTransformer``: ``patch_embed.proj``, ``cls_token``,
``reg_token``, ``pos_embed``, ``blocks.N`` (``norm1``, ``attn.qkv``, ``attn.proj``,
``drop_path1``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``drop_path2``), ``norm``, ``fc_norm``,
``head``. The default configuration is ViT-S/16 (Dosovitskiy et al. 2021,
https://arxiv.org/abs/2010.11929) with 4 register tokens (Darcet et al. 2024, "Vision
Transformers Need Registers", https://arxiv.org/abs/2309.16588) and an average-pooled head,
as timm's ``vit_*_reg4_gap`` models: position embeddings cover the patches only, the head
averages the patch tokens (prefix tokens excluded) and normalises them with ``fc_norm``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from service.models.zoo.common import (
    Classifier,
    DropPath,
    ImageSize,
    Mlp,
    PatchEmbed,
    Size,
    build_seeded,
)

EPS = 1e-6
Pool = Literal["token", "avg"]


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (timm's ``Attention``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.num_heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask`` as ``F.scaled_dot_product_attention`` takes it (timm's signature)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = Attention(dim, heads)
        self.drop_path1 = DropPath()
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path2 = DropPath()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformerSdpa(Classifier):
    """ViT with class and register tokens, batch-first ``(N, T, D)`` throughout.

    Args:
        patch, dim, depth, heads, num_classes, image_size: as for
            :class:`service.models.zoo.vit.VisionTransformer`.
        reg_tokens: register tokens after the class token.
        global_pool: ``"avg"`` (mean of the patch tokens, then ``fc_norm``) or ``"token"``
            (the class token after ``norm``).
    """

    def __init__(
        self,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        num_classes: int,
        image_size: ImageSize,
        reg_tokens: int = 4,
        global_pool: Pool = "avg",
    ) -> None:
        super().__init__()
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 + reg_tokens
        self.patch_embed = PatchEmbed(patch, dim, image_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        # timm: an average-pooled head normalises after pooling (fc_norm) instead of before.
        avg = global_pool == "avg"
        self.norm: nn.Module = nn.Identity() if avg else nn.LayerNorm(dim, eps=EPS)
        self.fc_norm: nn.Module = nn.LayerNorm(dim, eps=EPS) if avg else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        self.num_features = dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(N, prefix + patches, D)``: class token, register tokens, patches."""
        x = self.patch_embed(x) + self.pos_embed
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = self.blocks(torch.cat([*prefix, x], dim=1))
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the mean patch token (``"avg"``) or the class token (``"token"``)."""
        if self.global_pool == "token":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return self.head(self.fc_norm(pooled))


def build(
    size: Size = "tiny",
    num_classes: int = 1000,
    image_size: ImageSize = 224,
    seed: int = 0,
    reg_tokens: int = 4,
    global_pool: Pool = "avg",
) -> VisionTransformerSdpa:
    """ViT-S/16 with SDPA attention and register tokens (22.1M parameters at 1000 classes).

    Args:
        size: ``"full"``: 12 blocks of width 384, 6 heads, 16 px patches; ``"tiny"``: 2 blocks
            of width 32, 2 heads, 8 px patches.
        num_classes: logits.
        image_size: input size (sides multiples of the patch); sets the position embeddings.
        seed: seeds every weight.
        reg_tokens: register tokens (0 for none).
        global_pool: ``"avg"`` or ``"token"``.
    """
    patch, dim, depth, heads = (16, 384, 12, 6) if size == "full" else (8, 32, 2, 2)
    return build_seeded(
        lambda: VisionTransformerSdpa(
            patch, dim, depth, heads, num_classes, image_size, reg_tokens, global_pool
        ),
        seed,
    )
