"""Faithfulness scores of saliency maps: one module per score (deletion and insertion share
one), each registered with ``@register_score``; all run on the ONNX Runtime forward.

Importing this package imports every module in it, which runs their decorators: adding a
score is adding a module (then ``make protos`` for the ``Score`` enum).
"""

import importlib
import pkgutil

from service.engine.registry import SCORES
from service.engine.scores.base import ScoreContext, compute_scores
from service.engine.scores.curves import deletion_insertion_auc
from service.engine.scores.mu_fidelity import mu_fidelity

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

SCORE_NAMES = tuple(SCORES.names())
"""Names of the registered scores, as they go on the wire."""

__all__ = [
    "SCORE_NAMES",
    "ScoreContext",
    "compute_scores",
    "deletion_insertion_auc",
    "mu_fidelity",
]
