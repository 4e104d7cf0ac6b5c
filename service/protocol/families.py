"""The name families of the wire, and the one rule between a name and its enum value.

``grad_cam_pp`` is ``METHOD_GRAD_CAM_PP`` in ``enum Method``; a mask kind, a score and a
map encoding follow the same rule with their own prefix. ``make protos`` renders the
registry-driven enums with :func:`Family.value_name`, and :mod:`service.protocol.names`
reads them back with :func:`Family.name_of`: the rule exists here only. Standard library
only (``make protos`` uses it while the generated code is being rewritten).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One enum of the proto whose values are registry (or fixed) names.

    Attributes:
        enum: the proto enum's name, e.g. ``"Method"``.
        prefix: its values' prefix, e.g. ``"METHOD_"``.
        what: how messages name one member, e.g. ``"method"``.
        unspecified: what the ``*_UNSPECIFIED = 0`` value means on the wire.
    """

    enum: str
    prefix: str
    what: str
    unspecified: str

    def value_name(self, name: str) -> str:
        """``grad_cam_pp`` -> ``METHOD_GRAD_CAM_PP``."""
        return self.prefix + name.upper()

    def name_of(self, value_name: str) -> str:
        """``METHOD_GRAD_CAM_PP`` -> ``grad_cam_pp`` (the inverse of :meth:`value_name`)."""
        return value_name.removeprefix(self.prefix).lower()

    @property
    def unspecified_name(self) -> str:
        return self.prefix + "UNSPECIFIED"


METHOD = Family("Method", "METHOD_", "method", "Not a method: every MethodRequest sets one.")
MASK = Family("MaskKind", "MASK_KIND_", "mask", "Same as MASK_KIND_THRESHOLD.")
SCORE = Family("Score", "SCORE_", "score", "Not a score: every entry of `scores` sets one.")
VISUALIZATION = Family(
    "Visualization", "VISUALIZATION_", "visualisation method", "Same as VISUALIZATION_MACO."
)
MAP_ENCODING = Family("MapEncoding", "MAP_ENCODING_", "map encoding", "Same as MAP_ENCODING_PNG8.")

DEFAULT_METHOD = "vanilla_gradient"
"""Explained when a request lists no method."""
DEFAULT_MASK = "threshold"
"""Computed when a request leaves ``mask.kind`` unset."""
DEFAULT_VISUALIZATION = "maco"
"""Run when a ``VisualizeClassRequest`` leaves ``method`` unset."""
DEFAULT_MAP_ENCODING = "png8"
"""Used when a request leaves ``map_encoding`` unset."""
