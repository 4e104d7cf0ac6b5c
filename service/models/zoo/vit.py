"""ViT-S/16 (Dosovitskiy et al. 2021, https://arxiv.org/abs/2010.11929) on PyTorch's own layers.

Built from ``nn.TransformerEncoderLayer`` (pre-norm, GELU) as users write ViTs without
timm: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.0`` ... ``blocks.11``
(each with ``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``), ``norm``,
``head``. The blocks run sequence-first, ``(T, N, D)``: ``nn.MultiheadAttention``'s default
``batch_first=False`` layout, which the CAM layer finder must recognise as tokens. The head
reads the class token only.
"""

from __future__ import annotations

import torch
from torch import nn

from service.models.zoo.common import Classifier, ImageSize, PatchEmbed, Size, build_seeded

EPS = 1e-6


class VisionTransformer(Classifier):
    """ViT with a class token, learned position embeddings and a class-token head.

    Args:
        patch: patch side in pixels.
        dim: token width.
        depth: transformer blocks.
        heads: attention heads per block.
        num_classes: logits.
        image_size: input size; fixes the number of position embeddings.
    """

    num_prefix_tokens = 1

    def __init__(
        self, patch: int, dim: int, depth: int, heads: int, num_classes: int, image_size: ImageSize
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim, image_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, dim))
        self.blocks = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(
                    dim,
                    heads,
                    4 * dim,
                    dropout=0.0,
                    activation="gelu",
                    layer_norm_eps=EPS,
                    batch_first=False,
                    norm_first=True,
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.head = nn.Linear(dim, num_classes)
        self.num_features = dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(N, 1 + patches, D)``, class token first."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x.transpose(0, 1)).transpose(0, 1)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the class token."""
        return self.head(tokens[:, 0])


def build(
    size: Size = "tiny", num_classes: int = 1000, image_size: ImageSize = 224, seed: int = 0
) -> VisionTransformer:
    """ViT-S/16: 12 blocks of width 384, 6 heads (22.1M parameters at 1000 classes, 224 px).

    Args:
        size: ``"full"`` as published; ``"tiny"`` 2 blocks of width 32, 2 heads, 8 px patches.
        num_classes: logits.
        image_size: input size (sides multiples of the patch); sets the position embeddings.
        seed: seeds every weight.
    """
    if size == "full":
        return build_seeded(
            lambda: VisionTransformer(16, 384, 12, 6, num_classes, image_size), seed
        )
    return build_seeded(lambda: VisionTransformer(8, 32, 2, 2, num_classes, image_size), seed)
