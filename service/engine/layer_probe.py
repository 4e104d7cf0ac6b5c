"""One hooked forward pass of a random image, and what it saw: the CAM layer finder's probe.

:func:`run_probe` hooks every module, runs the model once in eval mode with autograd on, and
records each module's tensor output with the autograd node that produced it, and how many
times each module ran. :func:`token_grids` reads patch grids off what was recorded. Every
hook is removed on every path, also when the model raises, and each module's training mode
is restored.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.engine.errors import UnsupportedMethodError

MAX_PREFIX_TOKENS = 32  # class, distillation and register tokens before the patches
PROBE_SEED = 0
Hook = Callable[[nn.Module, object, object], None]


@dataclass
class Output:
    """One module call's tensor output, as the probe saw it."""

    seq: int
    name: str
    tensor: torch.Tensor
    node: Any  # the autograd node that produced it (tensor.grad_fn at return time)
    version: int


@dataclass
class Probe:
    """What one hooked forward pass recorded."""

    logits: torch.Tensor
    outputs: list[Output] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)

    def once(self, out: Output) -> bool:
        return self.calls[out.name] == 1

    def same_output(self, chosen: Output) -> tuple[str, ...]:
        """Other modules that ran once and returned the very tensor ``chosen`` names."""
        return tuple(
            o.name
            for o in self.outputs
            if o.node is chosen.node and o.name != chosen.name and self.once(o)
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every module's own mode restored after."""
    modes = {module: module.training for module in model.modules()}
    try:
        with contextlib.suppress(NotImplementedError):  # an exported program refuses eval()
            model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def probe_pixels(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A seeded random image ``(1, C, H, W)`` on the model's device, in its dtype."""
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    pixels = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(PROBE_SEED))
    return pixels.to(device=device, dtype=dtype)


def run_probe(model: nn.Module, input_shape: tuple[int, int, int]) -> Probe:
    """Run ``model`` once on :func:`probe_pixels`, every module hooked; see the module doc."""
    outputs: list[Output] = []
    calls: dict[str, int] = {}
    owner = threading.get_ident()

    def record(name: str) -> Hook:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            if threading.get_ident() != owner:
                return  # another thread's forward of a shared model is not ours to count
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                outputs.append(Output(len(outputs), name, output, output.grad_fn, output._version))

        return hook

    pixels = probe_pixels(model, input_shape).requires_grad_(True)
    handles = []
    try:
        # named_modules() yields a shared module once: one hook, which fires once per call.
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(record(name)))
        with eval_mode(model), torch.enable_grad():
            logits = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, torch.Tensor) or logits.grad_fn is None:
        raise UnsupportedMethodError(
            "no CAM layer: the model's output is not a logits tensor computed from its input"
        )
    return Probe(logits, outputs, calls)


def token_length(tensor: torch.Tensor) -> int:
    """Sequence length of a probe tensor (batch 1): ``(1, T, D)`` or ``(T, 1, D)``; else 0."""
    if tensor.dim() != 3:
        return 0
    if tensor.shape[0] == 1:
        return int(tensor.shape[1])
    return int(tensor.shape[0]) if tensor.shape[1] == 1 else 0


def patch_grid(
    length: int, input_shape: tuple[int, int, int], seen: tuple[tuple[int, int], ...] = ()
) -> tuple[int, int] | None:
    """The patch grid ``(gh, gw)`` of a ``length``-token sequence, or ``None``.

    ``length`` must be ``prefix + gh * gw`` with at most :data:`MAX_PREFIX_TOKENS` prefix
    tokens. Grids in ``seen`` (the 4-D outputs a probe saw, such as a patch embedding's
    ``(N, D, gh, gw)``) are tried first, then the input size divided by a patch side that
    divides both sides.
    """
    height, width = input_shape[1], input_shape[2]
    sides = range(1, min(height, width) + 1)
    inferred = [(height // p, width // p) for p in sides if height % p == 0 == width % p]
    for grid in (*seen, *inferred):
        if grid[0] * grid[1] > 1 and 0 <= length - grid[0] * grid[1] <= MAX_PREFIX_TOKENS:
            return grid
    return None


def token_grids(probe: Probe, input_shape: tuple[int, int, int]) -> dict[int, tuple[int, int]]:
    """Token length -> patch grid, for every length the probe saw that has one."""
    seen = tuple(
        (int(o.tensor.shape[-2]), int(o.tensor.shape[-1]))
        for o in probe.outputs
        if o.tensor.dim() == 4
    )
    found: dict[int, tuple[int, int]] = {}
    for out in probe.outputs:
        length = token_length(out.tensor)
        if length == 0 or length in found:
            continue
        grid = patch_grid(length, input_shape, seen)
        if grid is not None:
            found[length] = grid
    return found
