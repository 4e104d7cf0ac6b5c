"""Attention probabilities of a transformer, captured per forward pass and thread-safely.

The transformer-native methods (attention rollout, gradient-weighted attention) read every
self-attention's probabilities ``P = softmax(Q K^T * scale + mask)``, ``(N, heads, T, T)``.
Fused kernels never materialise ``P``, so inside :func:`capture_attention` the calling
thread's attention is computed explicitly, and each ``P`` is recorded as the very tensor
that multiplies the values (gradients with respect to it are exact):

* ``F.scaled_dot_product_attention`` (timm-style models) is replaced by the formula it
  stands for: scale, causal and given masks, grouped-query heads;
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, so also
  ``nn.TransformerEncoderLayer``) runs with ``need_weights=True,
  average_attn_weights=False``, its explicit path; the caller gets back what it asked for.
  Their fused fast paths refuse to run while a torch function mode is active;
* a softmax over the last axis of a square ``(N, heads, T, T)`` tensor (attention written
  by hand, as in timm's non-fused path or ``nn.Softmax`` in vit-pytorch) is recorded as it is.

The interception is a :class:`torch.overrides.TorchFunctionMode`. Torch function modes are
thread-local: a capture sees and changes only its own thread's forwards, so one engine can
serve concurrent batches, which a process-wide monkeypatch of
``F.scaled_dot_product_attention`` could not. The mode is popped when the ``with`` block
ends, also when the model raises. What a model's attention looks like (layers, heads,
tokens, grid, the rows its head reads) is found once, by :func:`find_attention`.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from service.engine.errors import UnsupportedMethodError

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)


@dataclass(frozen=True)
class AttentionCall:
    """One attention evaluation: ``probs`` as it sits in the graph, and its 4-D shape."""

    probs: torch.Tensor  # (N, heads, T, S), or (N * heads, T, S) for nn.MultiheadAttention
    shape: tuple[int, int, int, int]  # (N, heads, T, S)
    module: str = ""  # the innermost module that ran it, when a module stack was given

    def view(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """``probs`` (or a tensor of its shape, e.g. its gradient) as ``(N, heads, T, S)``,
        detached, in float32 or wider (the methods' sums run at full precision, also
        under reduced-precision autocast)."""
        viewed = (self.probs if tensor is None else tensor).detach().reshape(self.shape)
        return viewed.to(torch.promote_types(viewed.dtype, torch.float32))


@dataclass
class AttentionCapture:
    """The attention calls one capture recorded, in the order they ran (call-local)."""

    calls: list[AttentionCall] = field(default_factory=list)


class _AttentionMode(TorchFunctionMode):
    """Explicit attention with recorded probabilities; see the module docstring."""

    def __init__(self, capture: AttentionCapture, where: Callable[[], str]) -> None:
        super().__init__()
        self.capture = capture
        self.where = where

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: object,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._mha(args, kwargs)
        result = func(*args, **kwargs)
        if func in _SOFTMAXES and _is_attention_softmax(result, args, kwargs):
            self._record(result, tuple(result.shape))
        return result

    def _record(self, probs: torch.Tensor, shape: tuple[int, ...]) -> None:
        batch, heads, queries, keys = shape
        self.capture.calls.append(AttentionCall(probs, (batch, heads, queries, keys), self.where()))

    def _sdpa(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if dropout_p > 0.0:
            raise UnsupportedMethodError(
                "the model applies attention dropout when evaluated: its attention is random"
            )
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(repeat, dim=-3)
            value = value.repeat_interleave(repeat, dim=-3)
        factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = torch.matmul(query, key.transpose(-2, -1)) * factor
        queries, keys = scores.shape[-2], scores.shape[-1]
        if is_causal:
            causal = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        probs = torch.softmax(scores, dim=-1)
        if probs.dim() == 4:
            self._record(probs, tuple(probs.shape))
        elif probs.dim() == 3:  # unbatched (heads, T, S): one item
            self._record(probs, (1, *probs.shape))
        return torch.matmul(probs, value)

    def _mha(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        wanted, averaged = bound.arguments["need_weights"], bound.arguments["average_attn_weights"]
        if bound.arguments["is_causal"] and bound.arguments["attn_mask"] is None:
            raise UnsupportedMethodError("causal attention without a mask cannot be captured")
        bound.arguments["need_weights"] = True
        bound.arguments["average_attn_weights"] = False
        output, weights = F.multi_head_attention_forward(*bound.args, **bound.kwargs)
        if weights is None:  # need_weights=True always returns them
            raise UnsupportedMethodError("nn.MultiheadAttention returned no weights")
        # ``weights`` is a view, made after the product with the values, of the softmax
        # output that the product used: that base is the tensor in the graph.
        base = weights._base if weights._base is not None else weights
        heads = int(bound.arguments["num_heads"])
        queries, keys = int(weights.shape[-2]), int(weights.shape[-1])
        if base.numel() != weights.numel() or base.numel() % (heads * queries * keys):
            raise UnsupportedMethodError("nn.MultiheadAttention's weights could not be captured")
        self._record(base, (base.numel() // (heads * queries * keys), heads, queries, keys))
        if not wanted:
            return output, None
        return output, weights.mean(dim=-3) if averaged else weights


def _is_attention_softmax(result: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A softmax over the last axis of an ``(N, heads, T, T)`` tensor: attention by hand."""
    if not isinstance(result, torch.Tensor) or result.dim() != 4:
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return dim in (-1, 3) and result.shape[-1] == result.shape[-2]


@contextmanager
def capture_attention(where: Callable[[], str] = str) -> Iterator[AttentionCapture]:
    """Record the calling thread's attention probabilities inside the block.

    Args:
        where: names the module running when an attention call happens (for
            :func:`find_attention`); the default records no name.

    Yields:
        An :class:`AttentionCapture` filled as forwards run.
    """
    capture = AttentionCapture()
    with _AttentionMode(capture, where):
        yield capture


@contextmanager
def module_stack(model: nn.Module) -> Iterator[Callable[[], str]]:
    """A function naming the innermost module of ``model`` running now (this thread's)."""
    stack: list[str] = []
    owner = threading.get_ident()

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            if threading.get_ident() == owner:
                stack.append(name)

        return hook

    def leave(*_: object) -> None:
        if threading.get_ident() == owner and stack:
            stack.pop()

    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(enter(name)))
                handles.append(module.register_forward_hook(leave, always_call=True))
        yield lambda: stack[-1] if stack else ""
    finally:
        for handle in handles:
            handle.remove()
