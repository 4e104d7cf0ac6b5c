"""The zoo's tiny models as the engine serves them, for the registry-wide tests.

Each engine finds its CAM layer and attention itself (``"auto"``, what ``archive``
records), and its forward-only methods run on the torch model without autograd (the ONNX
artifacts of the same models are checked for parity in ``tests/models/test_zoo.py`` and
served in ``tests/integration/test_zoo_serving.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from service.engine.engine import Engine
from service.engine.modules import freeze
from service.engine.registry import MethodSpec, ParamValue
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO
from service.protocol.errors import InvalidInputError
from service.runtime.wrap import Normalized

SIZE = 64  # the tiny zoo models' test size: CNNs end on a 2x2 map, ViTs on 8x8 patches
CLASSES = 5
CHEAP_SAMPLES = 4  # sample, step, mask and design counts: enough for every property here
CHEAP_GRID = 4  # cells per side of perturbation grids


def served(name: str, image: int | tuple[int, int] = SIZE) -> nn.Module:
    """Zoo model ``name`` (tiny) in pixel space, frozen: what ``archive`` exports."""
    net = ZOO[name]("tiny", CLASSES, image, 0)
    return freeze(Normalized(net, IMAGENET_MEAN, IMAGENET_STD))


def torch_forward(model: nn.Module) -> object:
    """A numpy forward (``NumpyForward``) over ``model``, in inference mode."""

    def forward(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(pixels)).float().numpy()

    return forward


def auto_engine(model: nn.Module, chunk_size: int | None = None) -> Engine:
    """An engine over a pixel-space ``model`` of :data:`SIZE` inputs, CAM layer and
    attention found for it, forward-only methods on the torch model."""
    return Engine(
        model,
        target_layer="auto",
        attention="auto",
        input_shape=(3, SIZE, SIZE),
        forward_numpy=torch_forward(model),  # type: ignore[arg-type]
        chunk_size=chunk_size,
    )


def zoo_engine(name: str) -> Engine:
    """An engine over the tiny zoo model ``name`` that can run every method it supports."""
    return auto_engine(served(name), chunk_size=16)


def cheap_params(spec: MethodSpec) -> dict[str, ParamValue]:
    """Every ``n_*`` count at :data:`CHEAP_SAMPLES` and every ``grid_size`` at
    :data:`CHEAP_GRID` (or their minimum), where the method accepts that."""
    params: dict[str, ParamValue] = {}
    for p in spec.params:
        if p.kind == "int" and p.name.startswith("n_"):
            params[p.name] = max(int(p.minimum or 1), CHEAP_SAMPLES)
        elif p.kind == "int" and p.name == "grid_size":
            params[p.name] = max(int(p.minimum or 1), CHEAP_GRID)
    try:
        spec.resolve_params(params, (3, SIZE, SIZE))
    except InvalidInputError:
        return {}
    return params
