"""Real architectures in plain torch (torchvision does not install here), with random weights.

``ZOO`` maps a name to its builder ``build(size, num_classes, image_size, seed)``: ``"tiny"``
is small enough for a forward and backward at 64 px in well under a second on 2 CPU cores,
``"full"`` is the published configuration (224 px). Layer names are those of the reference
implementations (torchvision's ``layer4``, ``features.8``; timm's ``stages.3``,
``blocks.11``), because users' checkpoints and target-layer settings use them. Every model
is a :class:`Classifier`: ``forward_features`` (last feature map, or tokens for the ViTs),
``forward_head``, and ``num_prefix_tokens`` on the ViTs.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from service.models.zoo import convnext, efficientnet, resnet, vit, vit_sdpa
from service.models.zoo.common import Classifier, ImageSize, Size

Builder = Callable[[Size, int, ImageSize, int], Classifier]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ZOO: MappingProxyType[str, Builder] = MappingProxyType(
    {
        "resnet18": resnet.build_resnet18,
        "resnet50": resnet.build,
        "efficientnet_b0": efficientnet.build,
        "convnext_tiny": convnext.build,
        "vit_s16": vit.build,
        "vit_s16_sdpa_reg4": vit_sdpa.build,
    }
)
"""Architecture name -> builder, in the order the tests and benches report them."""


def eager_spec(name: str, size: Size, num_classes: int, image_size: int) -> dict[str, Any]:
    """The ``archive`` eager spec of zoo model ``name``: its builder, by module and name, and
    the builder's arguments (weights come from ``seed`` 0, so no weights file)."""
    builder = ZOO[name]
    kwargs = {"size": size, "num_classes": num_classes, "image_size": image_size, "seed": 0}
    return {"module": builder.__module__, "class": builder.__name__, "kwargs": kwargs}


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ZOO",
    "Builder",
    "Classifier",
    "ImageSize",
    "Size",
    "eager_spec",
]
