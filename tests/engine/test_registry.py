"""The registries: members documented, signatures equal to their declared parameters,
defaults inside their own bounds, and parameters parsed once with bounded messages."""

from __future__ import annotations

import inspect
import math
import re

import pytest

from service.engine import docs
from service.engine.registry import (
    MASKS,
    METHODS,
    SCORES,
    Member,
    MethodSpec,
    Param,
    ParamValue,
    ResolvedParams,
    check_signature,
    get_method,
    register_method,
)
from service.protocol.errors import InvalidInputError, UnknownMethodError
from service.protocol.params import ParamSet

MEMBERS: list[Member] = [*METHODS.members(), *MASKS.members(), *SCORES.members()]
IDS = [f"{type(m).__name__}:{m.name}" for m in MEMBERS]
POSITIONAL = {"MethodSpec": 3, "MaskSpec": 2, "ScoreSpec": 4}
TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_member_is_documented(member: Member) -> None:
    assert re.fullmatch(r"[a-z][a-z0-9_]*", member.name)
    assert member.description and "\n" not in member.description
    if member.paper:  # only a mask that does nothing ("none") cites no paper
        # One line that ends with the paper: "(Author et al. YEAR...)".
        assert re.search(r"\([^()]*\b(19|20)\d\d\b[^()]*\)$", member.description)
        assert member.paper.startswith("https://")
    else:
        assert member.name == "none" and not member.params
    for param in member.params:
        assert param.doc and "\n" not in param.doc


@pytest.mark.parametrize("spec", METHODS.members(), ids=METHODS.names())
def test_method_capabilities_are_consistent(spec: MethodSpec) -> None:
    assert spec.backend in ("torch", "onnx")
    assert spec.forward_only == (not spec.needs_gradients)
    # ONNX Runtime gives no gradient; a torch method may still be forward only (rollout
    # reads the torch model's attention without a backward).
    assert spec.backend == "torch" or spec.forward_only
    assert not (spec.needs_layer and spec.needs_attention)


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_function_takes_exactly_the_declared_parameters(member: Member) -> None:
    # Checked for every member: no method hides its parameters behind **params.
    signature = inspect.signature(member.fn, eval_str=True)
    arguments = list(signature.parameters.values())
    positional = POSITIONAL[type(member).__name__]
    assert all(a.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for a in arguments[:positional])
    keyword = arguments[positional:]
    assert [a.name for a in keyword] == [p.name for p in member.params]
    for argument, param in zip(keyword, member.params, strict=True):
        assert argument.kind is inspect.Parameter.KEYWORD_ONLY
        assert argument.default is inspect.Parameter.empty, "defaults live in the Param"
        assert argument.annotation is TYPES[param.kind]


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_defaults_are_inside_their_own_bounds(member: Member) -> None:
    for param in member.params:
        value = param.default
        assert isinstance(value, TYPES[param.kind]) and not (
            param.kind != "bool" and isinstance(value, bool)
        )
        if param.choices:
            assert value in param.choices
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert math.isfinite(value)
            if param.minimum is not None:
                assert value > param.minimum if param.minimum_exclusive else value >= param.minimum
            if param.maximum is not None:
                assert value < param.maximum if param.maximum_exclusive else value <= param.maximum
    assert member.resolve_params(None) == dict(member.defaults)
    assert member.resolve_params({p.name: str(p.default) for p in member.params}) == dict(
        member.defaults
    )


def test_a_function_that_disagrees_with_its_params_is_refused_at_registration() -> None:
    params = (Param("n_steps", "int", 4, "steps", minimum=1),)

    def with_default(ctx: object, inputs: object, targets: object, *, n_steps: int = 4) -> None:
        return None

    def mistyped(ctx: object, inputs: object, targets: object, *, n_steps: float) -> None:
        return None

    def hidden(ctx: object, inputs: object, targets: object, **params: object) -> None:
        return None

    for fn, problem in [(with_default, "default"), (mistyped, "annotates"), (hidden, "keyword")]:
        with pytest.raises(TypeError, match=problem):
            check_signature(fn, 3, ParamSet("method 'x'", params))
    with pytest.raises(TypeError):
        register_method(
            "not_registered",
            backend="torch",
            needs_gradients=True,
            description="x (A 2020)",
            paper="https://x",
            params=params,
        )(hidden)
    assert "not_registered" not in METHODS.names()


def test_unknown_method_names_known_ones() -> None:
    with pytest.raises(UnknownMethodError, match="known: ") as err:
        get_method("deconvnet")
    for name in METHODS.names():
        assert name in str(err.value)


def test_wire_strings_are_parsed_to_the_declared_types() -> None:
    spec = get_method("integrated_gradients")
    params = spec.resolve_params({"n_steps": " 8 ", "blur_sigma": "2.5", "baseline": "blurred"})
    assert params == {
        "n_steps": 8,
        "integration": "gauss_legendre",
        "baseline": "blurred",
        "blur_sigma": 2.5,
    }
    assert type(params["n_steps"]) is int and type(params["blur_sigma"]) is float
    assert params.wire()["blur_sigma"] == "2.5"
    flag = Param("flag", "bool", False, "a switch")
    assert [flag.parse(v, "x") for v in ("true", "FALSE", "1", "0", True)] == [
        True,
        False,
        True,
        False,
        True,
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 4}, r"no parameter 'steps' \(known: n_steps, integration, baseline, blur_sigma"),
        ({"n_steps": "four"}, "'n_steps' .* must be an integer"),
        ({"n_steps": 2.5}, "must be an integer"),
        ({"n_steps": True}, "must be an integer"),
        ({"n_steps": 0}, "must be >= 1 and <= 1024, got 0"),
        ({"n_steps": "1025"}, "must be >= 1 and <= 1024"),
        ({"blur_sigma": "nan"}, "finite"),
        ({"blur_sigma": float("inf")}, "finite"),
        ({"blur_sigma": "-inf"}, "finite"),
        ({"blur_sigma": "1e999"}, "finite"),
        ({"blur_sigma": 0.0}, "must be > 0"),
        ({"baseline": "gray"}, "one of black, blurred, uniform"),
        ({"baseline": 3}, "must be a string"),
        ({"integration": "riemann_trapezoid", "n_steps": 1}, "riemann_trapezoid"),
    ],
)
def test_bad_parameters_are_invalid_input_naming_the_rule(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        get_method("integrated_gradients").resolve_params(overrides)


@pytest.mark.parametrize(
    "overrides",
    [{"x" * 100_000: "1"}, {"n_steps": "9" * 100_000}, {"baseline": "b" * 100_000}],
    ids=["name", "int", "choice"],
)
def test_messages_stay_bounded_whatever_the_input(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError) as err:
        get_method("integrated_gradients").resolve_params(overrides)
    assert len(str(err.value)) < 400
    assert "100" in str(err.value)  # says how long the value was


def test_cross_parameter_and_input_size_checks_run_at_resolution() -> None:
    occlusion = get_method("occlusion")
    with pytest.raises(InvalidInputError, match="stride 6 must not exceed window 4"):
        occlusion.resolve_params({"window": 4, "stride": 6})
    assert occlusion.resolve_params({"window": 40, "stride": 8})["window"] == 40
    with pytest.raises(InvalidInputError, match="larger than the model's 32x32 input"):
        occlusion.resolve_params({"window": 40, "stride": 8}, (3, 32, 32))
    with pytest.raises(InvalidInputError, match="power of two"):
        get_method("sobol").resolve_params({"n_designs": 12})


def test_resolved_params_are_a_frozen_hashable_group_key() -> None:
    spec = get_method("smoothgrad")
    a = spec.resolve_params({"n_samples": "4"})
    b = spec.resolve_params({"n_samples": 4, "noise_level": 0.15})
    assert a == b and hash(a) == hash(b) and len({a: 1, b: 2}) == 1
    assert a != spec.resolve_params({"n_samples": 5})
    assert spec.resolve_params(a) is a  # resolved once, never parsed again
    with pytest.raises(TypeError):
        a["n_samples"] = 3  # type: ignore[index]
    overrides: dict[str, ParamValue] = {"n_samples": 4}
    assert isinstance(spec.resolve_params(overrides), ResolvedParams)


def test_docs_page_is_generated_from_the_registry() -> None:
    assert docs.DOC_PATH.read_text(encoding="utf-8") == docs.render(), (
        "docs/methods.md is stale: run `python -m service.engine.docs --write`"
    )
    for spec in METHODS.members():
        assert f"`{spec.name}`" in docs.render()


@pytest.mark.parametrize(
    "member",
    [*METHODS.members(), *MASKS.members(), *SCORES.members()],
    ids=lambda member: member.name,
)
def test_every_parameter_is_bounded(member: Member) -> None:
    """Findings 3, 4 and 11: a parameter without bounds let one request make the work
    overflow, allocate gigabytes or return NaN. Every number has both bounds (NaN and
    infinities are refused by the parse), every string its choices."""
    for param in member.params:
        if param.kind in ("int", "float"):
            assert param.minimum is not None and param.maximum is not None, param.name
        elif param.kind == "str":
            assert param.choices, param.name
