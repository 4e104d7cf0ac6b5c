"""The layer CAM methods read: a spatial map, or patch tokens reshaped to their grid.

:class:`CamLayer` is what :func:`service.engine.layer_finder.find_cam_layer` answers and what
``model.json`` records; :func:`tokens_to_map` is the reshape a ViT's tokens need before a
CAM formula can treat them as ``(N, C, h, w)`` (pytorch-grad-cam's ``reshape_transform``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from service.engine.errors import UnsupportedMethodError

LayerKind = Literal["spatial", "tokens"]
Chosen = Literal["found", "given"]


@dataclass(frozen=True)
class CamLayer:
    """Where CAM methods read a model, and how it was chosen.

    Attributes:
        name: dotted module name, for :func:`service.engine.layers.resolve_layer`.
        kind: ``"spatial"``: the module outputs ``(N, C, h, w)``; ``"tokens"``: it outputs
            a token sequence, to reshape with :func:`tokens_to_map`.
        grid: ``(h, w)`` of the map, or of the patch grid for tokens (for the input size
            the layer was found with).
        channels: ``C`` of the map, or the token width ``D``.
        prefix_tokens: class and register tokens before the patch tokens (0 for maps).
        batch_first: tokens are ``(N, T, D)``; ``False`` for ``(T, N, D)``, the layout of
            ``nn.MultiheadAttention`` without ``batch_first``.
        how: one line saying what was chosen and why, for ``archive`` to print and record.
        same_output: other modules that return the very same tensor (enclosing blocks,
            identities after it): equivalent names a user may give instead.
        chosen: ``"found"`` by :func:`service.engine.layer_finder.find_cam_layer`, or
            ``"given"`` by the user and checked by
            :func:`service.engine.layer_finder.describe_layer`.
    """

    name: str
    kind: LayerKind
    grid: tuple[int, int]
    channels: int
    prefix_tokens: int = 0
    batch_first: bool = True
    how: str = ""
    same_output: tuple[str, ...] = ()
    chosen: Chosen = "found"

    def summary(self, prefix: str = "") -> str:
        """``"blocks.11 (tokens 14x14, 1 class/register token dropped)"``: name and shape,
        the name without ``prefix`` (the pixel-space wrapper's ``"model."``)."""
        name = self.name.removeprefix(prefix)
        height, width = self.grid
        if self.kind == "spatial":
            return f"{name} (spatial map {self.channels}x{height}x{width})"
        plural = "" if self.prefix_tokens == 1 else "s"
        dropped = f"{self.prefix_tokens} class/register token{plural} dropped"
        return f"{name} (tokens {height}x{width}, {dropped})"

    def to_map(self, activations: torch.Tensor) -> torch.Tensor:
        """The layer's output as an ``(N, C, h, w)`` map (tokens reshaped, maps unchanged)."""
        if self.kind == "spatial":
            return activations
        return tokens_to_map(
            activations, self.grid, self.prefix_tokens, batch_first=self.batch_first
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``model.json``); :meth:`from_json` reads it back."""
        return {
            "name": self.name,
            "kind": self.kind,
            "grid": list(self.grid),
            "channels": self.channels,
            "prefix_tokens": self.prefix_tokens,
            "batch_first": self.batch_first,
            "how": self.how,
            "same_output": list(self.same_output),
            "chosen": self.chosen,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CamLayer:
        height, width = (int(v) for v in raw["grid"])
        kind, chosen = raw["kind"], raw.get("chosen", "found")
        if kind not in ("spatial", "tokens"):
            raise ValueError(f"CAM layer kind must be 'spatial' or 'tokens', got {kind!r}")
        if chosen not in ("found", "given"):
            raise ValueError(f"CAM layer 'chosen' must be 'found' or 'given', got {chosen!r}")
        return cls(
            name=str(raw["name"]),
            kind=kind,
            grid=(height, width),
            channels=int(raw["channels"]),
            prefix_tokens=int(raw.get("prefix_tokens", 0)),
            batch_first=bool(raw.get("batch_first", True)),
            how=str(raw.get("how", "")),
            same_output=tuple(raw.get("same_output", ())),
            chosen=chosen,
        )


def tokens_to_map(
    tokens: torch.Tensor, grid: tuple[int, int], prefix: int, *, batch_first: bool = True
) -> torch.Tensor:
    """Patch tokens as a feature map: ``(N, T, D)`` -> ``(N, D, gh, gw)``, prefix dropped.

    Args:
        tokens: ``(N, T, D)``, or ``(T, N, D)`` with ``batch_first=False``; patch tokens
            in row-major grid order after ``prefix`` class/register tokens.
        grid: ``(gh, gw)`` patch grid, ``T == prefix + gh * gw``.
        prefix: tokens before the patches.
        batch_first: the layout of ``tokens``.

    Returns:
        ``(N, D, gh, gw)``, a view where the layout allows (gradients flow back to ``tokens``).

    Raises:
        UnsupportedMethodError: ``tokens`` is not 3-D or its length is not ``prefix + gh*gw``.
    """
    if tokens.dim() != 3:
        raise UnsupportedMethodError(f"expected tokens (N, T, D), got shape {tuple(tokens.shape)}")
    if not batch_first:
        tokens = tokens.transpose(0, 1)
    batch, length, width = tokens.shape
    height, wide = grid
    if length != prefix + height * wide:
        raise UnsupportedMethodError(
            f"{length} tokens do not hold {prefix} prefix tokens and a {height}x{wide} patch grid"
        )
    return tokens[:, prefix:].transpose(1, 2).reshape(batch, width, height, wide)
