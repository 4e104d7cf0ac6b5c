"""Class model visualisation: one module per method, registered in :mod:`.base`."""

from service.engine.visualize import gradient_ascent, maco
from service.engine.visualize.base import (
    VISUALIZERS,
    Progress,
    Visualization,
    VisualizerSpec,
    VisualizeRun,
)

__all__ = [
    "VISUALIZERS",
    "Progress",
    "Visualization",
    "VisualizeRun",
    "VisualizerSpec",
    "gradient_ascent",
    "maco",
]
