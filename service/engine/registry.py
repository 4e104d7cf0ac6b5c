"""The three name families of the engine -- methods, masks, scores -- as decorator registries.

Every consumer (the proto enums ``make protos`` renders, the CLI, the docs, ``GetModelInfo``,
the tests) reads names, capabilities and parameters from here; nothing keeps its own list.
A member's parameters are :class:`~service.protocol.params.Param`\\ s, and its function
takes them as typed keyword-only arguments without defaults (the default is written once,
in the ``Param``); registration checks that, so a function and its declaration cannot
drift apart. A registry imports its family's package (by name, on first lookup) to run the
members' decorators: the packages import this module, never the other way round.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from service.protocol.cost import Cost
from service.protocol.errors import InvalidInputError, UnknownMethodError, clip

# Members declare their parameters with these; importable from here with the decorators.
from service.protocol.params import Param as Param
from service.protocol.params import ParamSet
from service.protocol.params import ParamValue as ParamValue
from service.protocol.params import ResolvedParams as ResolvedParams

Backend = Literal["torch", "onnx"]
InputShape = tuple[int, int, int]
Validator = Callable[[ResolvedParams, InputShape | None], None]
"""Cross-parameter and input-size checks, run before any batch work: ``(params, (C, H, W))``;
the shape is ``None`` when unknown (those checks are skipped then)."""
CostFn = Callable[[ResolvedParams, InputShape], Cost]
"""Work of one image from the parameters and ``(C, H, W)`` (:mod:`service.protocol.cost`)."""


class Spec(Protocol):
    @property
    def name(self) -> str: ...


SpecT = TypeVar("SpecT", bound=Spec)


class Registry(Generic[SpecT]):
    """Members of one family by name.

    Args:
        what: how messages name a member (``"explanation method"``).
        package: the package whose import registers every member.
        error: raised for an unknown name.
    """

    def __init__(
        self, what: str, package: str, error: type[InvalidInputError] = InvalidInputError
    ) -> None:
        self.what = what
        self.package = package
        self.error = error
        self._specs: dict[str, SpecT] = {}

    def add(self, spec: SpecT) -> None:
        if spec.name in self._specs:
            raise ValueError(f"{self.what} {spec.name!r} registered twice")
        self._specs[spec.name] = spec

    def get(self, name: str) -> SpecT:
        """The member named ``name``; ``error`` listing the known names otherwise."""
        importlib.import_module(self.package)
        try:
            return self._specs[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._specs))
            raise self.error(f"unknown {self.what} {clip(name)} (known: {known})") from None

    def members(self) -> list[SpecT]:
        """Every member, sorted by name."""
        importlib.import_module(self.package)
        return [self._specs[name] for name in sorted(self._specs)]

    def names(self) -> list[str]:
        return [spec.name for spec in self.members()]


def check_signature(fn: Callable[..., Any], positional: int, params: ParamSet) -> None:
    """``TypeError`` unless ``fn`` takes ``positional`` arguments, then exactly ``params``
    as keyword-only arguments without defaults, each annotated with its parameter's type."""
    signature = inspect.signature(fn, eval_str=True)
    kinds = [p.kind for p in signature.parameters.values()]
    leading = [
        k
        for k in kinds
        if k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    keyword = {n: p for n, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY}
    problems = []
    if len(leading) != positional or len(leading) + len(keyword) != len(kinds):
        problems.append(f"takes {positional} positional arguments and no *args/**kwargs")
    if list(keyword) != params.names():
        problems.append(f"has keyword-only arguments {params.names()}, got {list(keyword)}")
    for declared in params:
        argument = keyword.get(declared.name)
        if argument is not None and argument.default is not inspect.Parameter.empty:
            problems.append(f"leaves the default of {declared.name!r} to its Param")
        if argument is not None and argument.annotation is not declared.python_type:
            problems.append(f"annotates {declared.name!r} as {declared.kind}")
    if problems:
        raise TypeError(f"{params.owner}: {fn.__qualname__} must " + "; ".join(problems))


@dataclass(frozen=True)
class Member:
    """What every member has: name, function, parameters, docs, an optional check.

    Attributes:
        name: stable identifier used on the wire and in the CLI (``snake_case``).
        fn: the entry point; its signature is the family's (see the subclasses).
        params: the only accepted parameters, with their defaults and bounds.
        description: one line that ends with the paper reference.
        paper: link to the paper.
        validate: checks that involve several parameters or the input size.
    """

    name: str
    fn: Callable[..., Any]
    params: ParamSet
    description: str
    paper: str
    validate: Validator | None

    @property
    def defaults(self) -> ResolvedParams:
        return self.params.defaults

    def resolve_params(
        self,
        overrides: Mapping[str, object] | None = None,
        input_shape: InputShape | None = None,
    ) -> ResolvedParams:
        """Typed, bounded parameters: the defaults with ``overrides`` parsed on top, then
        the member's own cross-parameter / input-size check. Already resolved parameters
        are only checked, never parsed again."""
        if isinstance(overrides, ResolvedParams):
            if list(overrides) != self.params.names():
                raise ValueError(f"parameters {list(overrides)} are not those of {self.name}")
            params = overrides
        else:
            params = self.params.resolve(overrides)
        if self.validate is not None:
            self.validate(params, input_shape)
        return params


@dataclass(frozen=True)
class MethodSpec(Member):
    """An explanation method.

    Attributes:
        fn: ``fn(ctx, inputs, targets, *, <params>) -> Attribution`` over a batch
            (see :data:`service.engine.types.MethodFn`).
        backend: ``"torch"`` (needs a differentiable module) or ``"onnx"`` (forward only).
        needs_gradients: calls ``backward`` on the input.
        needs_layer, needs_attention: needs a CAM layer / the model's self-attention.
        batchable: items of a batch are computed together.
        cost: ``cost(params, (C, H, W)) -> Cost`` of one image, counted as the method
            evaluates the model (the contract tests count its calls).
    """

    backend: Backend
    needs_gradients: bool
    needs_layer: bool
    needs_attention: bool
    batchable: bool
    cost: CostFn

    @property
    def forward_only(self) -> bool:
        return not self.needs_gradients


@dataclass(frozen=True)
class MaskSpec(Member):
    """A mask: ``fn(image uint8 (H, W, 3), saliency (H, W), *, <params>)`` -> bool
    ``(H, W)``, or ``None`` for no mask."""


@dataclass(frozen=True)
class ScoreSpec(Member):
    """A score: ``fn(ctx, images, maps, targets, *, <params>)`` -> float64 ``(N,)``.
    ``higher_is_better``: which way a faithful map moves it; ``cost(params, (C, H, W))``: its
    work per map; ``reexplains(params)``: how often it re-runs the method per map, if it does."""

    higher_is_better: bool
    cost: CostFn
    reexplains: Callable[[ResolvedParams], int] | None


METHODS: Registry[MethodSpec] = Registry(
    "explanation method", "service.engine.methods", UnknownMethodError
)
MASKS: Registry[MaskSpec] = Registry("mask", "service.engine.masks")
SCORES: Registry[ScoreSpec] = Registry("score", "service.engine.scores")
_POSITIONAL = {MethodSpec: 3, MaskSpec: 2, ScoreSpec: 4}
FnT = TypeVar("FnT", bound=Callable[..., Any])


def _register(
    registry: Registry[Any], cls: type[Member], name: str, params: tuple[Param, ...], **fields: Any
) -> Callable[[FnT], FnT]:
    def decorate(fn: FnT) -> FnT:
        param_set = ParamSet(f"{registry.what} {name!r}", params)
        check_signature(fn, _POSITIONAL[cls], param_set)
        registry.add(cls(name=name, params=param_set, fn=fn, **fields))
        return fn

    return decorate


def register_method(
    name: str,
    *,
    backend: Backend,
    needs_gradients: bool,
    description: str,
    paper: str,
    cost: CostFn,
    params: tuple[Param, ...] = (),
    needs_layer: bool = False,
    needs_attention: bool = False,
    batchable: bool = True,
    validate: Validator | None = None,
) -> Callable[[FnT], FnT]:
    """Decorator that adds an explanation method under ``name``."""
    return _register(
        METHODS,
        MethodSpec,
        name,
        params,
        backend=backend,
        needs_gradients=needs_gradients,
        needs_layer=needs_layer,
        needs_attention=needs_attention,
        batchable=batchable,
        description=description,
        paper=paper,
        validate=validate,
        cost=cost,
    )


def register_mask(
    name: str,
    *,
    description: str,
    paper: str,
    params: tuple[Param, ...] = (),
    validate: Validator | None = None,
) -> Callable[[FnT], FnT]:
    """Decorator that adds a mask under ``name``."""
    return _register(
        MASKS, MaskSpec, name, params, description=description, paper=paper, validate=validate
    )


def register_score(
    name: str,
    *,
    description: str,
    paper: str,
    higher_is_better: bool,
    cost: CostFn,
    params: tuple[Param, ...] = (),
    reexplains: Callable[[ResolvedParams], int] | None = None,
) -> Callable[[FnT], FnT]:
    """Decorator that adds a score under ``name``."""
    return _register(
        SCORES,
        ScoreSpec,
        name,
        params,
        description=description,
        paper=paper,
        higher_is_better=higher_is_better,
        reexplains=reexplains,
        validate=None,
        cost=cost,
    )


def get_method(name: str) -> MethodSpec:
    """The method registered under ``name``; ``UnknownMethodError`` with the known names."""
    return METHODS.get(name)


list_methods, method_names = METHODS.members, METHODS.names


def iter_methods(backend: Backend | None = None) -> Iterator[MethodSpec]:
    return (m for m in list_methods() if backend is None or m.backend == backend)
