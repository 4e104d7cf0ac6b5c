"""What a request asks for, as domain types with ``from_pb`` / ``to_pb``.

``from_pb`` applies the wire's rules once -- enum numbers to registry names (unset or
unknown numbers are INVALID_ARGUMENT listing the known names), defaults for unset fields,
the legacy ``MaskOptions`` fields -- and ``to_pb`` is its inverse, so the client, the CLI
and the handler's JSON path build requests the same way. Parameter *values* stay raw
here: only the server knows each member's declared parameters, and parses them there.

Replies stay protobuf messages: a domain type would only copy them field by field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import InvalidInputError
from service.protocol.families import DEFAULT_MASK, DEFAULT_METHOD
from service.protocol.names import MAP_ENCODINGS, MASKS, METHODS, SCORES
from service.protocol.params import format_value

DEFAULT_TOP_K = 1
"""Targets explained when a request names none: the predicted class."""
DEFAULT_PREDICT_TOP_K = 5
"""Predictions listed by ``Predict`` (and at least this many by ``Explain``)."""
LEGACY_MASK_FIELDS = ("percentile", "foreground_quantile", "background_quantile")
"""``MaskOptions`` float fields from before ``params``: each is the mask parameter of the
same name; 0 means unset."""

Overrides = Mapping[str, object]


def _wire_params(params: Overrides) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        if not isinstance(value, bool | int | float | str):
            raise InvalidInputError(f"parameter {key!r} must be a bool, number or string")
        out[key] = format_value(value)
    return out


@dataclass(frozen=True)
class MethodCall:
    """One method to run, with overrides of its defaults (raw: strings or Python values)."""

    name: str
    params: Overrides = field(default_factory=dict)

    @classmethod
    def from_pb(cls, message: pb.MethodRequest) -> MethodCall:
        return cls(METHODS.name(message.method), dict(message.params))

    def to_pb(self) -> pb.MethodRequest:
        return pb.MethodRequest(
            method=METHODS.number(self.name),  # type: ignore[arg-type]
            params=_wire_params(self.params),
        )


@dataclass(frozen=True)
class MaskCall:
    """The mask to derive from every map, with overrides of its defaults.

    Attributes:
        name: a registered mask.
        params: overrides from ``MaskOptions.params`` (or a Python caller).
        legacy: the nonzero legacy float fields; they apply to the mask that declares a
            parameter of that name (the server checks), and are ignored by the others.
    """

    name: str = DEFAULT_MASK
    params: Overrides = field(default_factory=dict)
    legacy: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, message: pb.MaskOptions) -> MaskCall:
        params = dict(message.params)
        legacy = {}
        for name in LEGACY_MASK_FIELDS:
            value = getattr(message, name)
            if value:
                if name in params:
                    raise InvalidInputError(
                        f"mask {name} is set twice: set mask.{name} or mask.params[{name!r}]"
                    )
                # float32 on the wire: its shortest decimal, so 0.95 stays 0.95
                legacy[name] = float(f"{value:.7g}")
        return cls(MASKS.name(message.kind), params, legacy)

    def overrides(self, declared: list[str]) -> dict[str, object]:
        """``params`` plus the legacy fields the mask declares."""
        return {**{k: v for k, v in self.legacy.items() if k in declared}, **self.params}

    def to_pb(self) -> pb.MaskOptions:
        message = pb.MaskOptions(
            kind=MASKS.number(self.name),  # type: ignore[arg-type]
            params=_wire_params(self.params),
        )
        for name, value in self.legacy.items():
            setattr(message, name, value)
        return message


@dataclass(frozen=True)
class ExplainQuery:
    """An ``ExplainRequest`` with the wire's defaults applied and names for numbers.

    Attributes:
        image: the image as sent (encoded bytes or a tensor); decoded by the server.
        model: served model name; empty means the server's default.
        top_k: explain the ``top_k`` predicted classes, unless ``targets`` is given.
        targets: explicit target classes.
        methods: what to run; a request listing none runs the default method.
        mask: the mask of every map.
        scores: faithfulness scores of every map.
        map_encoding: ``"png8"`` or ``"float16"``.
        seed: seed of every random draw.
    """

    image: pb.Image
    model: str = ""
    top_k: int = DEFAULT_TOP_K
    targets: tuple[int, ...] = ()
    methods: tuple[MethodCall, ...] = (MethodCall(DEFAULT_METHOD),)
    mask: MaskCall = field(default_factory=MaskCall)
    scores: tuple[str, ...] = ()
    map_encoding: str = MAP_ENCODINGS.name(0)
    seed: int = 0

    @classmethod
    def from_pb(cls, message: pb.ExplainRequest) -> ExplainQuery:
        methods = tuple(MethodCall.from_pb(m) for m in message.methods)
        return cls(
            image=message.image,
            model=message.model,
            top_k=message.top_k or DEFAULT_TOP_K,
            targets=tuple(int(t) for t in message.target_classes),
            methods=methods or (MethodCall(DEFAULT_METHOD),),
            mask=MaskCall.from_pb(message.mask),
            scores=tuple(SCORES.name(s) for s in message.scores),
            map_encoding=MAP_ENCODINGS.name(message.map_encoding),
            seed=int(message.seed),
        )

    def to_pb(self) -> pb.ExplainRequest:
        return pb.ExplainRequest(
            model=self.model,
            image=self.image,
            top_k=self.top_k,
            target_classes=self.targets,
            methods=[m.to_pb() for m in self.methods],
            mask=self.mask.to_pb(),
            map_encoding=MAP_ENCODINGS.number(self.map_encoding),  # type: ignore[arg-type]
            seed=self.seed,
            scores=[SCORES.number(s) for s in self.scores],  # type: ignore[misc]
        )


@dataclass(frozen=True)
class PredictQuery:
    """A ``PredictRequest`` with its default applied."""

    image: pb.Image
    model: str = ""
    top_k: int = DEFAULT_PREDICT_TOP_K

    @classmethod
    def from_pb(cls, message: pb.PredictRequest) -> PredictQuery:
        return cls(message.image, message.model, message.top_k or DEFAULT_PREDICT_TOP_K)

    def to_pb(self) -> pb.PredictRequest:
        return pb.PredictRequest(model=self.model, image=self.image, top_k=self.top_k)
