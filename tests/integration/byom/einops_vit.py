"""A small ViT written the vit-pytorch way -- einops reshapes, attention by hand -- as a user
brings one: its file imports a third-party package (einops, listed in requirements.txt) and
a package folder of its own (vitparts/, shipped with ``--extra-files``).

Weights are drawn from ``seed`` in the constructor, so the model is the same wherever it is
built; a trained model would ship ``--weights`` instead.
"""

import torch
from einops.layers.torch import Rearrange
from torch import nn
from vitparts import Block


class ViT(nn.Module):
    def __init__(
        self,
        num_classes: int = 3,
        image_size: int = 32,
        patch: int = 8,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.to_patches = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
            nn.LayerNorm(patch * patch * 3),
            nn.Linear(patch * patch * 3, dim),
            nn.LayerNorm(dim),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                is_norm_scale = param.dim() == 1 and name.endswith("weight")
                param.copy_(1 + 0.1 * noise if is_norm_scale else 0.2 * noise)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.to_patches(images)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embedding
        return self.head(self.blocks(tokens)[:, 0])
