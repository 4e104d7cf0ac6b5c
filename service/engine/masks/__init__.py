"""Masks from a saliency map: one module per mask, each registered with ``@register_mask``.

Importing this package imports every module in it, which runs their decorators: adding a
mask is adding a module (then ``make protos`` for the ``MaskKind`` enum), with no list to
keep. The library functions are re-exported for callers outside the registry.
"""

import importlib
import pkgutil

from service.engine.masks.base import Box, largest_component_box, normalise_map
from service.engine.masks.grabcut import grabcut_mask
from service.engine.masks.threshold import threshold_mask

__all__ = ["Box", "grabcut_mask", "largest_component_box", "normalise_map", "threshold_mask"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
