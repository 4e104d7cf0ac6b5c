"""Find the CAM layer from the data flow into the classifier head.

A CAM layer is the feature map the logits are computed from: in a CNN the last spatial map
the head pools, in a ViT the patch tokens of the last blocks. "The last 4-D output seen" is
not that: a ViT's last 4-D output is its patch-embedding convolution, and a model may
compute a 4-D tensor after its features that the head never reads.

:func:`find_cam_layer` runs one forward pass with a hook on every module and walks the
autograd graph back from the logits. The walk stops at the first tensors that a module
returned -- counting only modules that ran exactly once, since a hook on a module called
many times (one activation instance shared by every block) cannot tell its calls apart --
and that are a spatial map ``(N, C, H, W)`` with ``H * W > 1`` or a token sequence whose
length is ``prefix + gh * gw`` for the input's patch grid. Those tensors are what the head
reads. Every hook is removed on every path, also when the model raises.
"""

from __future__ import annotations

import torch
from torch import nn

from service.engine.cam_layer import CamLayer
from service.engine.errors import UnsupportedMethodError
from service.engine.layer_probe import Output, Probe, run_probe, token_grids, token_length
from service.engine.layers import resolve_layer


def find_cam_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> CamLayer:
    """The layer CAM methods should read, found on one forward pass of a random image.

    CNNs: the last spatial map the classifier head consumes. The module named is the one
    that produced that tensor, or -- if that module runs more than once per forward, like
    the ReLU a ResNet block calls three times -- the innermost enclosing module that
    returned it (``layer4.2``; ``same_output`` lists ``layer4``, which returns the same
    tensor). When no module that runs once returns it (the head reads a shared activation
    applied in the top-level ``forward``), the layer is the map that activation was applied to.

    ViTs: the token sequence the head reads, ``T = prefix + gh * gw`` with the patch grid
    from the patch embedding's output (else from the input size). If the head reads only
    the class token, the last block's output gives the patch tokens no gradient (its CAM
    would be zero), so the answer is the latest token map of the model's width whose patch
    tokens the logits depend on: the last block's first norm, as pytorch-grad-cam advises.

    The probe runs the model in eval mode (batch-norm statistics must not move) and
    restores each module's mode afterwards.

    Args:
        model: the classifier (pixel space, as the engine serves it).
        input_shape: ``(C, H, W)`` of one input.

    Returns:
        A :class:`CamLayer`.

    Raises:
        UnsupportedMethodError: the logits depend on no spatial map and no token sequence
            (CAM methods are unavailable for this model); the message says what is missing.
    """
    probe = run_probe(model, input_shape)
    grids = token_grids(probe, input_shape)
    frontier, passed = _frontier(probe, grids)
    if not frontier:
        raise UnsupportedMethodError(
            f"no CAM layer: for a {input_shape[1]}x{input_shape[2]} input the logits depend on "
            "no module output that is a spatial map (N, C, H, W) with H*W > 1 or a token "
            "sequence of prefix + patch-grid length; CAM methods are unavailable for this model"
        )
    last = max(frontier, key=lambda out: out.seq)
    if last.tensor.dim() == 4:
        return _spatial(probe, last, passed, input_shape)
    return _tokens(probe, last, grids[token_length(last.tensor)])


def _frontier(probe: Probe, grids: dict[int, tuple[int, int]]) -> tuple[list[Output], list[Output]]:
    """The maps and token sequences the head reads, and the shared-module outputs passed over.

    Walks the autograd graph from the logits and stops at nodes that produced a candidate
    (a spatial map, or tokens of a known grid) returned by a module that ran once; a
    candidate returned only by modules that ran more than once is walked through.
    """
    by_node: dict[int, list[Output]] = {}
    for out in probe.outputs:
        spatial = out.tensor.dim() == 4 and out.tensor.shape[-2] * out.tensor.shape[-1] > 1
        if spatial or token_length(out.tensor) in grids:
            by_node.setdefault(id(out.node), []).append(out)
    frontier: list[Output] = []
    passed: list[Output] = []
    seen: set[int] = set()
    stack = [probe.logits.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        outs = by_node.get(id(node), [])
        producer = next((o for o in outs if probe.once(o)), None)  # the first to return it
        if producer is not None:
            frontier.append(producer)
            continue
        passed.extend(outs)
        stack.extend(parent for parent, _ in node.next_functions)
    return frontier, passed


def _spatial(
    probe: Probe, chosen: Output, passed: list[Output], input_shape: tuple[int, int, int]
) -> CamLayer:
    _, channels, height, width = (int(d) for d in chosen.tensor.shape)
    how = (
        f"last spatial map the head consumes: {chosen.name} ({channels}x{height}x{width} for a "
        f"{input_shape[1]}x{input_shape[2]} input)"
    )
    inner = [o.name for o in probe.outputs if o.node is chosen.node and not probe.once(o)]
    if inner:
        how += f"; produced by {_runs(probe, inner)}, so named by the enclosing module"
    shared = [o.name for o in passed]
    if shared:
        how += f"; the head reads {_runs(probe, shared)}, which a hook cannot read for one call"
    same = probe.same_output(chosen)
    if same:
        how += f"; the same tensor is the output of {', '.join(same)}"
    return CamLayer(chosen.name, "spatial", (height, width), channels, how=how, same_output=same)


def _runs(probe: Probe, names: list[str]) -> str:
    """``"a (runs 3 times per forward), b (...)"`` for modules that run more than once."""
    unique = sorted(set(names))
    return ", ".join(f"{name} (runs {probe.calls[name]} times per forward)" for name in unique)


def _tokens(probe: Probe, last: Output, grid: tuple[int, int]) -> CamLayer:
    """The latest token map like ``last`` (length and width) whose patch tokens matter.

    One backward pass gives the logits' gradient with respect to every candidate; a map
    whose patch tokens get an identically zero gradient (every block after the class
    token's last read, when the head reads only that token) would give an all-zero CAM.
    """
    length, width = token_length(last.tensor), int(last.tensor.shape[-1])
    prefix = length - grid[0] * grid[1]
    candidates, nodes = [], set()
    for out in probe.outputs:
        alike = token_length(out.tensor) == length and int(out.tensor.shape[-1]) == width
        fresh = out.tensor._version == out.version  # not changed in place since it was returned
        if out.seq > last.seq or not alike or not fresh or not probe.once(out):
            continue
        if id(out.node) not in nodes:  # the producer: the first module to return the tensor
            nodes.add(id(out.node))
            candidates.append(out)
    grads = torch.autograd.grad(
        probe.logits.sum(), [c.tensor for c in candidates], allow_unused=True
    )
    skipped = []
    for out, grad in sorted(zip(candidates, grads, strict=True), key=lambda c: -c[0].seq):
        if grad is None:
            continue
        batch_first = out.tensor.shape[0] == 1
        patches = grad[:, prefix:] if batch_first else grad[prefix:]
        if not bool(patches.abs().amax() > 0):
            skipped.append(out.name)
            continue
        layout = "(N, T, D)" if batch_first else "(T, N, D)"
        how = (
            f"last token map the logits depend on: {out.name} ({length} tokens of width "
            f"{width} in {layout}: {prefix} prefix + {grid[0]}x{grid[1]} patch grid)"
        )
        if skipped:
            how += (
                f"; the patch tokens of the later {', '.join(skipped[:3])}"
                f"{' ...' if len(skipped) > 3 else ''} do not reach the logits (the head "
                "reads prefix tokens only)"
            )
        same = probe.same_output(out)
        return CamLayer(out.name, "tokens", grid, width, prefix, batch_first, how, same)
    raise UnsupportedMethodError(
        f"no CAM layer: the logits depend on no patch token of any {length}-token map "
        f"({prefix} prefix + {grid[0]}x{grid[1]} grid); CAM methods are unavailable"
    )


def describe_layer(model: nn.Module, name: str, input_shape: tuple[int, int, int]) -> CamLayer:
    """The CAM layer a user named, checked on one forward pass of a random image.

    It must exist, run exactly once per forward (a hook cannot tell the calls of a module
    run several times apart), output a spatial map ``(N, C, H, W)`` with ``H * W > 1`` or
    a token sequence of ``prefix + gh * gw`` tokens, and the logits must depend on it (on
    its patch tokens, for tokens: else its CAM is blank).

    Args:
        model: the classifier (pixel space, as the engine serves it).
        name: dotted module name, e.g. ``"model.layer4"``.
        input_shape: ``(C, H, W)`` of one input.

    Returns:
        A :class:`CamLayer` with ``chosen="given"``.

    Raises:
        InvalidInputError: no module has that name (the message lists candidates).
        UnsupportedMethodError: it is not a CAM layer; the message says why.
    """
    resolve_layer(model, name)
    probe = run_probe(model, input_shape)
    runs = probe.calls.get(name, 0)
    if runs != 1:
        raise UnsupportedMethodError(
            f"target layer {name!r} runs {runs} times per forward; CAM needs a layer that "
            "runs exactly once (name the block that encloses it)"
        )
    out = next((o for o in probe.outputs if o.name == name), None)
    if out is None:
        raise UnsupportedMethodError(
            f"target layer {name!r} does not return one tensor computed from the input"
        )
    (grad,) = torch.autograd.grad(probe.logits.sum(), out.tensor, allow_unused=True)
    if grad is None:
        raise UnsupportedMethodError(f"the logits do not depend on target layer {name!r}")
    shape, same = tuple(out.tensor.shape), probe.same_output(out)
    if out.tensor.dim() == 4 and shape[-2] * shape[-1] > 1:
        _, channels, height, width = (int(d) for d in shape)
        how = f"given: {name} ({channels}x{height}x{width} for a {_side(input_shape)} input)"
        return CamLayer(
            name, "spatial", (height, width), channels, how=how, same_output=same, chosen="given"
        )
    length = token_length(out.tensor)
    grid = token_grids(probe, input_shape).get(length)
    if grid is None:
        raise UnsupportedMethodError(
            f"target layer {name!r} outputs {shape}: neither a spatial map (N, C, H, W) with "
            "H*W > 1 nor a token sequence of prefix + patch-grid length"
        )
    prefix, batch_first = length - grid[0] * grid[1], shape[0] == 1
    patches = grad[:, prefix:] if batch_first else grad[prefix:]
    if not bool(patches.abs().amax() > 0):
        raise UnsupportedMethodError(
            f"the patch tokens of target layer {name!r} do not reach the logits (the head "
            "reads prefix tokens only), so its CAM would be blank: name the last block's "
            "first norm, or give no target layer"
        )
    how = f"given: {name} ({length} tokens: {prefix} prefix + {grid[0]}x{grid[1]} patch grid)"
    width = int(shape[-1])
    return CamLayer(name, "tokens", grid, width, prefix, batch_first, how, same, "given")


def _side(input_shape: tuple[int, int, int]) -> str:
    return f"{input_shape[1]}x{input_shape[2]}"
