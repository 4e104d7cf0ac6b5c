"""Pieces the zoo architectures share: sizes, seeded weights, drop path, patch embedding.

Weights are random but deterministic: :func:`seeded` draws every parameter and batch-norm
statistic from one ``torch.Generator``, and refuses a parameter it has no rule for, so a
new layer cannot silently keep PyTorch's global-RNG initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

Size = Literal["tiny", "full"]
ImageSize = int | tuple[int, int]
M = TypeVar("M", bound=nn.Module)

TOKEN_STD = 0.02  # class/register tokens and position embeddings, as timm initialises them
LAYER_SCALE = (0.1, 0.3)  # range of random layer-scale values (trained ConvNeXts: ~0.1-1)


def pair(size: ImageSize) -> tuple[int, int]:
    """``(height, width)`` of an image size given as one side or as a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def build_seeded(make: Callable[[], M], seed: int) -> M:
    """``make()`` with :func:`seeded` weights, in eval mode; the global RNG is left untouched.

    Module constructors draw PyTorch's default initialisation from the global generator;
    forking it keeps a build from shifting the random numbers of whoever called it.
    """
    with torch.random.fork_rng(devices=[]):
        model = make()
    return seeded(model, seed).eval()


def seeded(model: M, seed: int) -> M:
    """Draw every parameter (and batch-norm statistics) of ``model`` from ``seed``, in place.

    Convolutions get He-normal weights (``std = sqrt(2 / fan_in)``), linear layers
    ``std = sqrt(1 / fan_in)``, norms a scale in ``[0.5, 1.5]`` and a small shift, batch
    norms random running statistics (so that folding them into convolutions is not a
    no-op), tokens and position embeddings ``N(0, 0.02)``, layer scales ``U(0.1, 0.3)``.
    Modules may shrink their residual branches afterwards (see each architecture).

    Raises:
        ValueError: a parameter that none of the rules covers.
    """
    gen = torch.Generator().manual_seed(seed)
    covered: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                _draw(module, name, param, gen)
                covered.add(id(param))
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.normal_(0.0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"no initialisation rule for {missing}")
    return model


def _draw(module: nn.Module, name: str, param: torch.Tensor, gen: torch.Generator) -> None:
    is_norm = isinstance(module, nn.BatchNorm2d | nn.LayerNorm)
    if name in ("bias", "in_proj_bias"):
        param.normal_(0.0, 0.1 if is_norm else 0.01, generator=gen)
    elif is_norm and name == "weight":
        param.uniform_(0.5, 1.5, generator=gen)
    elif isinstance(module, nn.Conv2d) and name == "weight":
        fan_in = param[0].numel()  # in_channels / groups * kh * kw
        param.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
    elif isinstance(module, nn.Linear | nn.MultiheadAttention) and "weight" in name:
        param.normal_(0.0, math.sqrt(1.0 / param.shape[1]), generator=gen)
    elif name in ("cls_token", "reg_token", "pos_embed"):
        param.normal_(0.0, TOKEN_STD, generator=gen)
    elif name == "gamma":
        param.uniform_(*LAYER_SCALE, generator=gen)
    else:
        raise ValueError(f"no initialisation rule for {type(module).__name__}.{name}")


def shrink_(norm: nn.Module, factor: float) -> None:
    """Scale a residual branch's last norm by ``factor`` so random deep nets stay in range.

    Eval-mode batch norm with random statistics does not renormalise, so each unscaled
    residual branch would double the variance of the stream: after 16 blocks the logits
    would be in the hundreds and float32 rounding alone would break a 1e-4 parity bound.
    """
    assert isinstance(norm, nn.BatchNorm2d)
    with torch.no_grad():
        norm.weight.mul_(factor)
        norm.bias.mul_(factor)


class Classifier(nn.Module):
    """What every zoo model offers (timm's interface): features, a head, logits of both.

    Attributes:
        num_features: channels of the last feature map, or the token width.
    """

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(N, C, h, w)``, or the tokens ``(N, T, D)`` of a ViT."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` from :meth:`forward_features`' output."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of normalised images ``(N, 3, H, W)``."""
        return self.forward_head(self.forward_features(x))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016, https://arxiv.org/abs/1603.09382) per sample.

    The identity in eval mode, which is how every served model runs.
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """Two linear layers with GELU between them, on the last axis (timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` map (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: ``(N, 3, H, W) -> (N, H/p * W/p, dim)``.

    Args:
        patch: side of a square patch (the convolution's kernel and stride).
        dim: token width.
        image_size: the input size; both sides must be multiples of ``patch``.
    """

    def __init__(self, patch: int, dim: int, image_size: ImageSize) -> None:
        super().__init__()
        height, width = pair(image_size)
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch {patch}")
        self.grid = (height // patch, width // patch)
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
