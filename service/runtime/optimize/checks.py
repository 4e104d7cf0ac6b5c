"""Whether a rewrite of a model still computes the same explanations, checked in float64."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection

import torch
from torch import nn

from service.runtime.optimize.timing import example_inputs

Rewrite = Callable[[nn.Module], nn.Module]


def check_rewrite(
    reference: nn.Module,
    rewrite: Rewrite,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    keep: Collection[str],
    fallback_rtol: float | None,
) -> str | None:
    """Why ``rewrite`` (applied to a copy) changes the model, or ``None`` when it does not.

    The rewrite is replayed on a float64 copy and compared with the float64 original: a
    correct rewrite agrees to ~1e-12 there, and a wrong one (a convolution output that is
    also used elsewhere) is off by orders of magnitude more. In float32 the two would differ
    by rounding alone, which a ReLU network amplifies in its input gradient (a unit whose
    pre-activation is within rounding of zero can switch), so a float32 comparison cannot
    tell a bug from rounding. A model that cannot run in float64 is compared in its own
    dtype with ``fallback_rtol``, or refused when that is ``None``.
    """
    try:
        wide = copy.deepcopy(reference).to(torch.float64)
        rewritten = rewrite(copy.deepcopy(wide))
        return _differs(wide, rewritten, shape, device, torch.float64, keep, rtol=1e-9)
    except RuntimeError as error:
        if fallback_rtol is None:
            return f"not checked in float64 ({error})"
        rewritten = rewrite(copy.deepcopy(reference))
        return _differs(reference, rewritten, shape, device, dtype, keep, rtol=fallback_rtol)


def _differs(
    reference: nn.Module,
    candidate: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    keep: Collection[str],
    rtol: float,
) -> str | None:
    """Why ``candidate`` is not ``reference`` on random inputs, or ``None`` when it is.

    Compares logits, the input gradient of the top logit, and the outputs of ``keep``
    layers, each as ``max |a - b| <= rtol * max |b|``.
    """
    inputs = example_inputs((min(shape[0], 2), *shape[1:]), device, dtype, seed=1)
    want = _outputs(reference, inputs, keep)
    got = _outputs(candidate, inputs, keep)
    for key, expected in want.items():
        actual = got.get(key)
        if actual is None or actual.shape != expected.shape:
            return f"{key} missing or of another shape"
        scale = float(expected.abs().max())
        error = float((actual - expected).abs().max())
        if error > rtol * max(scale, 1e-12):
            return f"{key} differs by {error:.3g} (max |value| {scale:.3g})"
    return None


def _outputs(
    model: nn.Module, inputs: torch.Tensor, keep: Collection[str]
) -> dict[str, torch.Tensor]:
    """Logits, the input gradient of the top logit and the outputs of the ``keep`` layers."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in keep:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue

        def hook(_m: nn.Module, _a: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                outputs[f"layer {name}"] = out.detach().clone()

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            leaf = inputs.clone().requires_grad_(True)
            logits = model(leaf)
            top = logits.detach().argmax(dim=1, keepdim=True)
            (grad,) = torch.autograd.grad(logits.gather(1, top).sum(), leaf)
    finally:
        for handle in handles:
            handle.remove()
    outputs["logits"] = logits.detach()
    outputs["input gradient"] = grad
    return outputs
