"""CRAFT concepts (Fel et al. 2023): per-class concept banks and their importance.

:mod:`.factorize` (NMF and its non-negative projection), :mod:`.bank` (building and
storing banks from random crops), :mod:`.importance` (Sobol total indices over concept
coefficients, with the layer's output replaced by rebuilt activations).
"""

from service.engine.concepts.bank import ClassConcepts, ConceptBank, build_bank
from service.engine.concepts.factorize import fit_concepts, project
from service.engine.concepts.importance import (
    ConceptAttribution,
    concept_importance,
    explain_concepts,
    importance_cost,
    replaced_output,
)

__all__ = [
    "ClassConcepts",
    "ConceptAttribution",
    "ConceptBank",
    "build_bank",
    "concept_importance",
    "explain_concepts",
    "fit_concepts",
    "importance_cost",
    "project",
    "replaced_output",
]
