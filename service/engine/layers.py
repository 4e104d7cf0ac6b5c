"""Named layers of a model: lookup, per-call activation capture.

The CAM layer itself is found by :func:`service.engine.layer_finder.find_cam_layer` (or a
given name checked by :func:`service.engine.layer_finder.describe_layer`), which answers a
:class:`service.engine.cam_layer.CamLayer` (spatial map or patch tokens, with
:func:`service.engine.cam_layer.tokens_to_map` for the latter).

Every hook registered here lives inside a ``with`` block and is removed in ``finally``, so a
model that raises mid-forward leaves no hook behind.

Concurrency: one module may be hooked by several threads at once (one engine serves
concurrent batches). A hook therefore only records forwards run *by the thread that
registered it* and ignores the others; each call keeps its activations in a call-local
object. Registration and removal are single dict operations under the GIL, and
``nn.Module.__call__`` snapshots its hook dict before iterating it, so no lock is needed and
CAM calls on the same layer run in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from service.protocol.errors import InvalidInputError, UnsupportedMethodError


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path as in ``model.named_modules()``).

    Args:
        model: the model to search.
        name: e.g. ``"features.3"`` or ``"layer4.1.conv2"``.

    Returns:
        The submodule.

    Raises:
        InvalidInputError: no submodule has that name; the message lists candidates.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    spatial = [n for n, m in modules.items() if n and isinstance(m, nn.Conv2d)]
    hint = ", ".join(spatial[-5:]) or ", ".join(n for n in list(modules)[1:6])
    raise InvalidInputError(f"model has no layer named {name!r} (e.g. {hint})")


@dataclass
class Capture:
    """Activations one call recorded at one layer (call-local, never shared)."""

    activations: list[torch.Tensor] = field(default_factory=list)

    def single(self) -> torch.Tensor:
        """The layer's output of the one forward pass; the layer must have run exactly once."""
        if len(self.activations) != 1:
            raise UnsupportedMethodError(
                f"target layer ran {len(self.activations)} times in one forward pass; "
                "CAM needs a layer that runs exactly once"
            )
        return self.activations[0]


@contextmanager
def capture_activations(layer: nn.Module, *, leaf: bool = False) -> Iterator[Capture]:
    """Record ``layer``'s outputs for forwards run by the calling thread, inside the block.

    The hook keeps the original output (part of the autograd graph, so gradients can be
    taken with respect to it) and hands a clone to the rest of the network, so an in-place
    op after the layer (``ReLU(inplace=True)``) cannot overwrite the recorded activations.
    This is what Captum does for layer gradients.

    Args:
        layer: the module to watch.
        leaf: record a detached copy that requires grad, and run the rest of the network
            from it. Gradients can then be taken with respect to the activations only, but
            autograd records nothing before the layer (with an input and parameters that
            do not require grad): the forward up to the layer costs what inference costs,
            and no tensor of those layers is kept for a backward that never runs.

    Yields:
        A :class:`Capture` filled as forwards run.
    """
    capture = Capture()
    owner = threading.get_ident()

    def hook(_module: nn.Module, _args: object, output: object) -> object:
        if threading.get_ident() != owner:
            return None  # another thread's forward: not ours to record or change
        if not isinstance(output, torch.Tensor):
            raise UnsupportedMethodError("target layer must output a single tensor")
        if leaf:
            output = output.detach().requires_grad_(True)
        capture.activations.append(output)
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()
