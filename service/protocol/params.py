"""Typed, bounded parameters: declared once, parsed once.

A registry member (method, mask, score) declares its parameters as :class:`Param`\\ s. A
request's overrides -- wire strings, or Python values from a library caller -- are parsed
here and nowhere else: types coerced, NaN and infinities refused, bounds and choices
checked, unknown names rejected with the known ones. Every message echoes user input at
most ~100 characters, so a hostile value never becomes a huge status. The result is a
:class:`ResolvedParams`, frozen and hashable: the pipeline groups batch work by it.
Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from service.protocol.errors import InvalidInputError, clip

ParamValue = bool | int | float | str
Kind = Literal["int", "float", "bool", "str"]
KINDS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def format_value(value: ParamValue) -> str:
    """The wire string of a typed value (what ``Explanation.params`` echoes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Param:
    """One parameter of a method, mask or score.

    Attributes:
        name: ``snake_case`` name used on the wire.
        kind: ``"int"``, ``"float"``, ``"bool"`` or ``"str"``.
        default: the value used when a request does not set it (written only here).
        doc: one line for docs and ``GetModelInfo``.
        minimum, maximum: bounds of numbers, ``None`` for none.
        minimum_exclusive, maximum_exclusive: whether the bound itself is refused.
        choices: the accepted values of a string parameter.
    """

    name: str
    kind: Kind
    default: ParamValue
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    minimum_exclusive: bool = False
    maximum_exclusive: bool = False
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A declaration error is a bug in the code, found at import time.
        if self.kind not in KINDS:
            raise TypeError(f"parameter {self.name!r}: unknown kind {self.kind!r}")
        if self.choices and self.kind != "str":
            raise TypeError(f"parameter {self.name!r}: only str parameters take choices")
        self.parse(self.default, "the default")

    @property
    def python_type(self) -> type:
        return KINDS[self.kind]

    def bounds_text(self) -> str:
        """``">= 1 and <= 1024"``, ``"one of a, b"``, or ``""``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.minimum_exclusive else '>='} {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.maximum_exclusive else '<='} {self.maximum:g}")
        return " and ".join(parts)

    def parse(self, value: object, owner: str) -> ParamValue:
        """``value`` (a wire string or a Python value) as this parameter's typed value.

        Raises:
            InvalidInputError: wrong type, NaN/inf, out of bounds or not a choice; the
                message names the parameter, its owner and the rule, and echoes at most
                ~100 characters of the value.
        """
        typed = self._coerce(value, owner)
        if isinstance(typed, str):
            if self.choices and typed not in self.choices:
                raise self._error(owner, value, self.bounds_text())
            return typed
        if isinstance(typed, bool):
            return typed
        low_ok = self.minimum is None or (
            typed > self.minimum if self.minimum_exclusive else typed >= self.minimum
        )
        high_ok = self.maximum is None or (
            typed < self.maximum if self.maximum_exclusive else typed <= self.maximum
        )
        if not (low_ok and high_ok):
            raise self._error(owner, value, "must be " + self.bounds_text())
        return typed

    def _coerce(self, value: object, owner: str) -> ParamValue:
        text = value.strip() if isinstance(value, str) else None
        if self.kind == "str":
            if text is None:
                raise self._error(owner, value, "must be a string")
            return text
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise self._error(owner, value, "must be true or false")
        if isinstance(value, bool):  # bool is an int to Python, never to a user
            raise self._error(owner, value, f"must be {self._a_kind()}")
        number: float | int
        try:
            if text is not None:
                number = int(text) if self.kind == "int" else float(text)
            elif isinstance(value, int | float):
                number = value
            else:
                raise ValueError
        except (ValueError, OverflowError):
            raise self._error(owner, value, f"must be {self._a_kind()}") from None
        if not math.isfinite(number):
            raise self._error(owner, value, "must be a finite number")
        if self.kind == "int":
            if isinstance(number, float) and not number.is_integer():
                raise self._error(owner, value, "must be an integer")
            return int(number)
        return float(number)

    def _a_kind(self) -> str:
        return "an integer" if self.kind == "int" else "a number"

    def _error(self, owner: str, value: object, rule: str) -> InvalidInputError:
        return InvalidInputError(f"parameter {self.name!r} of {owner} {rule}, got {clip(value)}")


class ResolvedParams(Mapping[str, ParamValue]):
    """Every parameter of one registry member with its typed value, in declared order.

    Immutable and hashable (a batching group key); a ``Mapping``, so a function declaring
    the parameters as keyword arguments is called with ``fn(..., **params)``.
    """

    __slots__ = ("_items",)

    def __init__(self, items: tuple[tuple[str, ParamValue], ...]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> ParamValue:
        for name, value in self._items:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResolvedParams):
            return self._items == other._items
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"ResolvedParams({dict(self._items)!r})"

    def wire(self) -> dict[str, str]:
        """``{name: wire string}``, as echoed in ``Explanation.params``."""
        return {name: format_value(value) for name, value in self._items}


class ParamSet:
    """The ordered, immutable parameters of one registry member.

    Args:
        owner: how messages name the member, e.g. ``"method 'smoothgrad'"``.
        params: the declarations; names must be unique.
    """

    def __init__(self, owner: str, params: tuple[Param, ...] = ()) -> None:
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{owner} declares a parameter twice: {names}")
        self.owner = owner
        self.params = params
        self._by_name = {p.name: p for p in params}
        self.defaults = ResolvedParams(tuple((p.name, p.default) for p in params))

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def names(self) -> list[str]:
        return list(self._by_name)

    def resolve(self, overrides: Mapping[str, object] | None = None) -> ResolvedParams:
        """The defaults with ``overrides`` parsed on top; unknown names are refused."""
        if not overrides:
            return self.defaults
        for key in overrides:
            if key not in self._by_name:
                known = ", ".join(self._by_name) or "none"
                raise InvalidInputError(
                    f"{self.owner} has no parameter {clip(key)} (known: {known})"
                )
        return ResolvedParams(
            tuple(
                (
                    p.name,
                    p.parse(overrides[p.name], self.owner) if p.name in overrides else p.default,
                )
                for p in self.params
            )
        )
