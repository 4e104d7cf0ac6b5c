"""What a model's attention looks like, found once (at archive time) and recorded.

:func:`find_attention` runs one forward pass of a random image under
:func:`service.engine.attention.capture_attention` and answers an :class:`AttentionInfo`:
which modules attend, with how many heads, over how many tokens, on which patch grid after
how many prefix (class/register) tokens, and which token rows of the last attention the
logits read (the class token, or the patch tokens of an average-pooled head). ``model.json``
records it; the attention methods check each forward against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.engine.attention import (
    AttentionCall,
    AttentionCapture,
    capture_attention,
    module_stack,
)
from service.engine.cam_layer import CamLayer
from service.engine.errors import UnsupportedMethodError
from service.engine.layer_probe import eval_mode, patch_grid, probe_pixels

READOUT_SEED = 0


@dataclass(frozen=True)
class AttentionLayer:
    """One self-attention evaluated per forward: the module that runs it, its heads."""

    module: str
    heads: int


@dataclass(frozen=True)
class AttentionInfo:
    """A model's self-attention, as the attention methods read it.

    Attributes:
        layers: every attention evaluated in one forward, in order.
        tokens: ``T``, the sequence length each attends over.
        grid: ``(gh, gw)`` patch grid; ``T == prefix_tokens + gh * gw``.
        prefix_tokens: class and register tokens before the patches.
        readout: token rows of the last attention whose output the logits depend on.
        how: one line saying what was found, for ``archive`` to print and record.
    """

    layers: tuple[AttentionLayer, ...]
    tokens: int
    grid: tuple[int, int]
    prefix_tokens: int
    readout: tuple[int, ...]
    how: str = ""

    def checked(self, capture: AttentionCapture, batch: int) -> list[AttentionCall]:
        """The captured calls of one forward of ``batch`` images, if they are as recorded."""
        calls = capture.calls
        if len(calls) != len(self.layers):
            raise UnsupportedMethodError(
                f"the model evaluated {len(calls)} attentions in one forward; "
                f"{len(self.layers)} were recorded when it was archived"
            )
        for call, layer in zip(calls, self.layers, strict=True):
            if call.shape != (batch, layer.heads, self.tokens, self.tokens):
                raise UnsupportedMethodError(
                    f"attention probabilities of shape {call.shape}; expected "
                    f"{(batch, layer.heads, self.tokens, self.tokens)} as recorded"
                )
        return calls

    def identity(self, calls: list[AttentionCall]) -> torch.Tensor:
        """``(B, T, T)`` identities, where rollout and relevance start, as the calls' views."""
        first = calls[0].view()
        eye = torch.eye(self.tokens, device=first.device, dtype=first.dtype)
        return eye.repeat(first.shape[0], 1, 1)

    def patch_map(self, relevance: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``(B, gh, gw)``: the mean of ``relevance``'s ``rows`` over the patch columns.

        Args:
            relevance: ``(B, T, T)``, row ``i`` the relevance of every token to token ``i``.
            rows: ``(B, T)`` weights of the rows to read (the readout), summing to 1.
        """
        read = torch.einsum("bt,bts->bs", rows.to(relevance), relevance)[:, self.prefix_tokens :]
        return read.reshape(-1, *self.grid)

    def readout_weights(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(B, T)``: equal weights on the recorded readout rows."""
        weights = torch.zeros(batch, self.tokens, device=device)
        weights[:, list(self.readout)] = 1.0 / len(self.readout)
        return weights

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``model.json``); :meth:`from_json` reads it back."""
        return {
            "layers": [{"module": layer.module, "heads": layer.heads} for layer in self.layers],
            "tokens": self.tokens,
            "grid": list(self.grid),
            "prefix_tokens": self.prefix_tokens,
            "readout": list(self.readout),
            "how": self.how,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AttentionInfo:
        height, width = (int(v) for v in raw["grid"])
        info = cls(
            layers=tuple(
                AttentionLayer(str(layer["module"]), int(layer["heads"])) for layer in raw["layers"]
            ),
            tokens=int(raw["tokens"]),
            grid=(height, width),
            prefix_tokens=int(raw["prefix_tokens"]),
            readout=tuple(int(r) for r in raw["readout"]),
            how=str(raw.get("how", "")),
        )
        if (
            not info.layers
            or not info.readout
            or info.tokens != info.prefix_tokens + height * width
        ):
            raise ValueError(f"inconsistent attention record: {raw}")
        return info


def find_attention(
    model: nn.Module, input_shape: tuple[int, int, int], cam_layer: CamLayer | None = None
) -> AttentionInfo:
    """The model's self-attention, from one forward pass of a random image.

    Args:
        model: the classifier (pixel space, as the engine serves it).
        input_shape: ``(C, H, W)`` of one input.
        cam_layer: the model's CAM layer; a token layer of the same length gives the grid
            and prefix, else they are inferred from the input size.

    Returns:
        An :class:`AttentionInfo`.

    Raises:
        UnsupportedMethodError: no attention, attention that is not one self-attention over
            the image's tokens per image (windows, reduced keys, items split across the
            batch), or logits that do not depend on the last attention; the message says which.
    """
    pixels = probe_pixels(model, input_shape).requires_grad_(True)
    with (
        module_stack(model) as where,
        capture_attention(where) as capture,
        eval_mode(model),
        torch.enable_grad(),
    ):
        logits = model(pixels)
    calls = capture.calls
    if not calls:
        raise UnsupportedMethodError(
            "no attention layers: the model calls neither F.scaled_dot_product_attention nor "
            "nn.MultiheadAttention, nor a softmax over (N, heads, T, T) scores"
        )
    shapes = {call.shape[0::2] + call.shape[3:] for call in calls}
    if len(shapes) != 1 or calls[0].shape[0] != 1 or calls[0].shape[2] != calls[0].shape[3]:
        seen = sorted({call.shape for call in calls})
        raise UnsupportedMethodError(
            "attention is not one self-attention over all of an image's tokens (windows, "
            f"reduced keys, or an image split over several sequences): shapes {seen[:3]}"
        )
    tokens = calls[0].shape[2]
    grid, prefix = _grid(tokens, input_shape, cam_layer)
    readout = _readout(logits, calls[-1])
    layers = tuple(AttentionLayer(call.module, call.shape[1]) for call in calls)
    heads = sorted({layer.heads for layer in layers})
    how = (
        f"{len(layers)} self-attention layers ({layers[0].module} ... {layers[-1].module}), "
        f"{'/'.join(map(str, heads))} heads, {tokens} tokens: {prefix} prefix + "
        f"{grid[0]}x{grid[1]} patch grid; the head reads {_rows_text(readout, prefix, tokens)}"
    )
    return AttentionInfo(layers, tokens, grid, prefix, readout, how)


def _grid(
    tokens: int, input_shape: tuple[int, int, int], cam_layer: CamLayer | None
) -> tuple[tuple[int, int], int]:
    if (
        cam_layer is not None
        and cam_layer.kind == "tokens"
        and cam_layer.prefix_tokens + cam_layer.grid[0] * cam_layer.grid[1] == tokens
    ):
        return cam_layer.grid, cam_layer.prefix_tokens
    grid = patch_grid(tokens, input_shape)
    if grid is None:
        raise UnsupportedMethodError(
            f"attention over {tokens} tokens: no patch grid of a {input_shape[1]}x"
            f"{input_shape[2]} input has that many tokens (with at most 32 prefix tokens)"
        )
    return grid, tokens - grid[0] * grid[1]


def _readout(logits: torch.Tensor, last: AttentionCall) -> tuple[int, ...]:
    """Rows of the last attention whose outputs reach the logits (any class).

    A random combination of the logits cannot cancel a row's gradient except by chance of
    measure zero; rows the head never reads get an exact zero.
    """
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(READOUT_SEED))
    score = (logits * weights.to(logits)).sum()
    (grad,) = torch.autograd.grad(score, last.probs, allow_unused=True)
    if grad is None:
        raise UnsupportedMethodError("the logits do not depend on the last attention layer")
    reached = last.view(grad).abs().sum(dim=(0, 1, 3)) > 0
    rows = tuple(int(i) for i in torch.nonzero(reached).flatten())
    if not rows:
        raise UnsupportedMethodError("the logits do not depend on the last attention layer")
    return rows


def _rows_text(rows: tuple[int, ...], prefix: int, tokens: int) -> str:
    if rows == (0,):
        return "the class token"
    if rows == tuple(range(prefix, tokens)):
        return f"the {tokens - prefix} patch tokens"
    return f"{len(rows)} token rows"
