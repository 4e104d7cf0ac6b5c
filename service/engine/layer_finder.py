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

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.engine.cam_layer import CamLayer
from service.engine.errors import UnsupportedMethodError

MAX_PREFIX_TOKENS = 32  # class, distillation and register tokens before the patches
PROBE_SEED = 0
Hook = Callable[[nn.Module, object, object], None]


@dataclass
class _Output:
    """One module call's tensor output, as the probe saw it."""

    seq: int
    name: str
    tensor: torch.Tensor
    node: Any  # the autograd node that produced it (tensor.grad_fn at return time)
    version: int


@dataclass
class _Probe:
    """What one hooked forward pass recorded."""

    logits: torch.Tensor
    outputs: list[_Output] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)

    def once(self, out: _Output) -> bool:
        return self.calls[out.name] == 1

    def same_output(self, chosen: _Output) -> tuple[str, ...]:
        """Other modules that ran once and returned the very tensor ``chosen`` names."""
        return tuple(
            o.name
            for o in self.outputs
            if o.node is chosen.node and o.name != chosen.name and self.once(o)
        )


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
    probe = _run_probe(model, input_shape)
    grids = _grids(probe, input_shape)
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
    return _tokens(probe, last, grids[_token_length(last.tensor)])


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    try:
        with contextlib.suppress(NotImplementedError):  # an exported program refuses eval()
            model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _run_probe(model: nn.Module, input_shape: tuple[int, int, int]) -> _Probe:
    outputs: list[_Output] = []
    calls: dict[str, int] = {}
    owner = threading.get_ident()

    def record(name: str) -> Hook:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            if threading.get_ident() != owner:
                return  # another thread's forward of a shared model is not ours to count
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                outputs.append(_Output(len(outputs), name, output, output.grad_fn, output._version))

        return hook

    first = next(iter([*model.parameters(), *model.buffers()]), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    pixels = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(PROBE_SEED))
    pixels = pixels.to(device=device, dtype=dtype).requires_grad_(True)
    handles = []
    try:
        # named_modules() yields a shared module once: one hook, which fires once per call.
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(record(name)))
        with _eval_mode(model), torch.enable_grad():
            logits = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, torch.Tensor) or logits.grad_fn is None:
        raise UnsupportedMethodError(
            "no CAM layer: the model's output is not a logits tensor computed from its input"
        )
    return _Probe(logits, outputs, calls)


def _token_length(tensor: torch.Tensor) -> int:
    """Sequence length of a probe tensor (batch 1): ``(1, T, D)`` or ``(T, 1, D)``; else 0."""
    if tensor.dim() != 3:
        return 0
    if tensor.shape[0] == 1:
        return int(tensor.shape[1])
    return int(tensor.shape[0]) if tensor.shape[1] == 1 else 0


def _grids(probe: _Probe, input_shape: tuple[int, int, int]) -> dict[int, tuple[int, int]]:
    """Token length -> patch grid, for every length seen that is ``prefix + gh * gw``.

    Grids come from the 4-D outputs seen (a patch embedding's ``(N, D, gh, gw)``) first,
    else from the input size divided by a patch size that divides both sides.
    """
    height, width = input_shape[1], input_shape[2]
    shapes = [o.tensor.shape for o in probe.outputs if o.tensor.dim() == 4]
    seen = [(int(shape[-2]), int(shape[-1])) for shape in shapes]
    sides = range(1, min(height, width) + 1)
    inferred = [(height // p, width // p) for p in sides if height % p == 0 == width % p]
    found: dict[int, tuple[int, int]] = {}
    for out in probe.outputs:
        length = _token_length(out.tensor)
        if length == 0 or length in found:
            continue
        for grid in (*seen, *inferred):
            if grid[0] * grid[1] > 1 and 0 <= length - grid[0] * grid[1] <= MAX_PREFIX_TOKENS:
                found[length] = grid
                break
    return found


def _frontier(
    probe: _Probe, grids: dict[int, tuple[int, int]]
) -> tuple[list[_Output], list[_Output]]:
    """The maps and token sequences the head reads, and the shared-module outputs passed over.

    Walks the autograd graph from the logits and stops at nodes that produced a candidate
    (a spatial map, or tokens of a known grid) returned by a module that ran once; a
    candidate returned only by modules that ran more than once is walked through.
    """
    by_node: dict[int, list[_Output]] = {}
    for out in probe.outputs:
        spatial = out.tensor.dim() == 4 and out.tensor.shape[-2] * out.tensor.shape[-1] > 1
        if spatial or _token_length(out.tensor) in grids:
            by_node.setdefault(id(out.node), []).append(out)
    frontier: list[_Output] = []
    passed: list[_Output] = []
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
    probe: _Probe, chosen: _Output, passed: list[_Output], input_shape: tuple[int, int, int]
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


def _runs(probe: _Probe, names: list[str]) -> str:
    """``"a (runs 3 times per forward), b (...)"`` for modules that run more than once."""
    unique = sorted(set(names))
    return ", ".join(f"{name} (runs {probe.calls[name]} times per forward)" for name in unique)


def _tokens(probe: _Probe, last: _Output, grid: tuple[int, int]) -> CamLayer:
    """The latest token map like ``last`` (length and width) whose patch tokens matter.

    One backward pass gives the logits' gradient with respect to every candidate; a map
    whose patch tokens get an identically zero gradient (every block after the class
    token's last read, when the head reads only that token) would give an all-zero CAM.
    """
    length, width = _token_length(last.tensor), int(last.tensor.shape[-1])
    prefix = length - grid[0] * grid[1]
    candidates, nodes = [], set()
    for out in probe.outputs:
        alike = _token_length(out.tensor) == length and int(out.tensor.shape[-1]) == width
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
