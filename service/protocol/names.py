"""Registry names <-> the generated enums' numbers, with errors that list the known names.

Every host converts through these four objects (``METHODS``, ``MASKS``, ``SCORES``,
``MAP_ENCODINGS``), so no module restates a prefix or keeps a list of names: the enums are
rendered from the registries by ``make protos``, and the names are read back from them.
"""

from __future__ import annotations

from typing import Any

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol import families
from service.protocol.errors import InvalidInputError, clip
from service.protocol.families import Family


class WireEnum:
    """One proto enum seen through its family's naming rule.

    Args:
        family: the naming rule.
        enum: the generated enum wrapper (``saliency_pb2.Method``).
        default: the name ``*_UNSPECIFIED`` stands for, or ``None`` when unset is an error.
    """

    def __init__(self, family: Family, enum: Any, default: str | None = None) -> None:
        self.family = family
        self.enum = enum
        self.default = default
        self._names = {
            number: family.name_of(value_name) for value_name, number in enum.items() if number != 0
        }
        self._numbers = {name: number for number, name in self._names.items()}

    def names(self) -> list[str]:
        """Every name on the wire, in enum number order."""
        return [self._names[number] for number in sorted(self._names)]

    def number(self, name: str) -> int:
        """The enum number of a registry name; INVALID_ARGUMENT listing the known ones."""
        try:
            return self._numbers[name]
        except (KeyError, TypeError):
            raise InvalidInputError(
                f"unknown {self.family.what} {clip(name)} (known: {', '.join(self.names())})"
            ) from None

    def name(self, number: int) -> str:
        """The registry name of an enum number; unset means the default (or is an error)."""
        if number == 0:
            if self.default is not None:
                return self.default
            raise InvalidInputError(
                f"{self.family.what} is unset: choose one of {self._value_names()}"
            )
        if number not in self._names:
            raise InvalidInputError(
                f"unknown {self.family.what} number {number}: choose one of {self._value_names()}"
            )
        return self._names[number]

    def label(self, number: int) -> str:
        """The name, or ``"unknown"``: a metric label from a closed set, never an error."""
        return self._names.get(number, "unknown")

    def _value_names(self) -> str:
        return ", ".join(self.family.value_name(name) for name in self.names())


METHODS = WireEnum(families.METHOD, pb.Method)
MASKS = WireEnum(families.MASK, pb.MaskKind, default=families.DEFAULT_MASK)
SCORES = WireEnum(families.SCORE, pb.Score)
VISUALIZATIONS = WireEnum(
    families.VISUALIZATION, pb.Visualization, default=families.DEFAULT_VISUALIZATION
)
MAP_ENCODINGS = WireEnum(
    families.MAP_ENCODING, pb.MapEncoding, default=families.DEFAULT_MAP_ENCODING
)
