"""Fold eval-mode batch norms into the convolutions that feed them.

An eval-mode ``BatchNorm2d`` is a per-channel affine map; after a convolution it can be
folded into that convolution's weights and bias. The forward then skips one pass over
every activation tensor, and the backward skips the batch-norm backward too (on ResNet-18
about a fifth of a gradient pass). The ``BatchNorm2d`` is replaced by ``nn.Identity`` *in
place*, so every module name stays valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from service.runtime.optimize.checks import Rewrite
from service.runtime.optimize.timing import example_inputs


def conv_bn_pairs(
    model: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where the batch norm's input is that convolution's output.

    Found by running one forward with hooks (so it follows the data flow of any model,
    traceable or not): each module must run exactly once, and the batch norm must receive
    the very tensor the convolution returned. Whether the convolution's output is *also*
    used elsewhere is not visible to hooks; the numerical check after folding catches it.
    """
    names = {id(m): n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    produced: dict[int, tuple[str, int]] = {}  # id(output tensor) -> (conv name, version)
    fed: dict[str, str] = {}  # bn name -> conv name
    keepalive: list[torch.Tensor] = []  # ids stay unique while the tensors live

    def conv_hook(module: nn.Module, _args: object, output: object) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (name, output._version)
            keepalive.append(output)

    def bn_hook(module: nn.Module, args: tuple[object, ...]) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        source = args[0] if args else None
        if isinstance(source, torch.Tensor) and id(source) in produced:
            conv_name, version = produced[id(source)]
            if source._version == version:  # not changed in place (conv -> ReLU_ -> BN)
                fed[name] = conv_name

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(conv_hook))
            elif isinstance(module, nn.BatchNorm2d):
                handles.append(module.register_forward_pre_hook(bn_hook))
        with torch.no_grad():
            model(example_inputs((1, *shape[1:]), device, dtype, seed=0))
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    pairs = []
    for bn_name, conv_name in fed.items():
        conv, bn = modules[conv_name], modules[bn_name]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        if calls.get(conv_name) != 1 or calls.get(bn_name) != 1:
            continue  # a shared module: folding would change its other uses
        if bn.training or bn.running_mean is None or bn.running_var is None:
            continue  # batch statistics, not an affine map
        if bn.num_features != conv.out_channels:
            continue
        pairs.append((conv_name, bn_name))
    return pairs


def _fold(model: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold ``bn`` into ``conv`` (in ``model``, in place) and put ``nn.Identity`` in its place.

    ``bn(conv(x)) = s * (W x + b - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, so the
    folded convolution has ``W' = s W`` (per output channel) and ``b' = s (b - mean) + beta``.
    Computed in float64 so the fold adds no rounding beyond the final cast.
    """
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        var = bn.running_var.double()
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    parent_name, _, child = bn_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())


def fold_all(pairs: Sequence[tuple[str, str]]) -> Rewrite:
    """A rewrite folding every ``(conv, bn)`` pair of ``pairs`` (in place, returning the model)."""

    def rewrite(model: nn.Module) -> nn.Module:
        for conv_name, bn_name in pairs:
            _fold(model, conv_name, bn_name)
        return model

    return rewrite
