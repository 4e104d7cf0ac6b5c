"""The one registry of explanation methods (timm-style decorator registry).

Every consumer -- the proto enum check, the CLI choices, the docs table, the tests -- reads
names, capabilities and defaults from here; nothing keeps its own list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from service.engine.errors import InvalidInputError, UnknownMethodError

if TYPE_CHECKING:
    from service.engine.types import MethodFn

ParamValue = bool | int | float | str
Backend = Literal["torch", "onnx"]


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method.

    Attributes:
        name: stable identifier used on the wire and in the CLI (``snake_case``).
        fn: entry point ``fn(ctx, inputs, targets, **params) -> Attribution`` over a batch.
        backend: ``"torch"`` (needs a differentiable module) or ``"onnx"`` (forward only).
        needs_gradients: calls ``backward`` on the input.
        needs_layer: needs a named spatial layer (CAM methods).
        batchable: items of a batch are computed together.
        defaults: parameter names with their default values; the only accepted parameters.
        description: one line, ends with the paper reference.
        paper: link to the paper.
    """

    name: str
    fn: MethodFn
    backend: Backend
    needs_gradients: bool
    needs_layer: bool
    batchable: bool
    defaults: Mapping[str, ParamValue]
    description: str
    paper: str
    aliases: tuple[str, ...] = field(default=())

    @property
    def forward_only(self) -> bool:
        return not self.needs_gradients

    def resolve_params(self, params: Mapping[str, ParamValue] | None) -> dict[str, ParamValue]:
        """Defaults overridden by ``params``; unknown names and wrong types are rejected."""
        resolved = dict(self.defaults)
        for key, value in (params or {}).items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise InvalidInputError(
                    f"method {self.name!r} has no parameter {key!r} (known: {known})"
                )
            resolved[key] = _coerce(self.name, key, value, self.defaults[key])
        return resolved


def _coerce(method: str, key: str, value: ParamValue, default: ParamValue) -> ParamValue:
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"parameter {key!r} of method {method!r} must be {kind.__name__}, got {value!r}"
        ) from None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    backend: Backend,
    needs_gradients: bool,
    description: str,
    paper: str,
    defaults: Mapping[str, ParamValue] | None = None,
    needs_layer: bool = False,
    batchable: bool = True,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator that adds a method to the registry under ``name``."""

    def decorate(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"explanation method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(
            name=name,
            fn=fn,
            backend=backend,
            needs_gradients=needs_gradients,
            needs_layer=needs_layer,
            batchable=batchable,
            defaults=MappingProxyType(dict(defaults or {})),
            description=description,
            paper=paper,
        )
        return fn

    return decorate


def _load_builtin_methods() -> None:
    # Importing the package runs every method module's decorator exactly once.
    import service.engine.methods  # noqa: F401


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; raises ``UnknownMethodError`` with the known names."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownMethodError(f"unknown explanation method {name!r} (known: {known})") from None


def list_methods() -> list[MethodSpec]:
    """All registered methods, sorted by name."""
    _load_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def method_names() -> list[str]:
    return [spec.name for spec in list_methods()]


def iter_methods(backend: Backend | None = None) -> Iterator[MethodSpec]:
    return (m for m in list_methods() if backend is None or m.backend == backend)
