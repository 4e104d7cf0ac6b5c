"""The registry: every method is documented, its defaults validate, errors name what exists."""

from __future__ import annotations

import inspect
import re

import pytest

from service.engine import docs
from service.engine.errors import InvalidInputError, UnknownMethodError
from service.engine.registry import MethodSpec, get_method, list_methods, method_names

SPECS = list_methods()


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_method_is_documented(spec: MethodSpec) -> None:
    assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
    assert "\n" not in spec.description
    # One line that ends with the paper: "(Author et al. YEAR...)".
    assert re.search(r"\([^()]*\b(19|20)\d\d\b[^()]*\)$", spec.description), spec.description
    assert spec.paper.startswith("https://")
    assert spec.backend in ("torch", "onnx")
    assert spec.forward_only == (not spec.needs_gradients)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_defaults_validate_and_match_the_signature(spec: MethodSpec) -> None:
    assert spec.resolve_params(None) == dict(spec.defaults)
    assert spec.resolve_params(dict(spec.defaults)) == dict(spec.defaults)
    # The entry point accepts exactly the registered parameters, with the same defaults.
    signature = inspect.signature(spec.fn)
    signature.bind(None, None, None, **spec.defaults)
    keyword = {
        name: p.default
        for name, p in signature.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    if keyword:
        assert keyword == dict(spec.defaults)


def test_unknown_method_names_known_ones() -> None:
    with pytest.raises(UnknownMethodError, match="known: ") as err:
        get_method("deconvnet")
    for name in method_names():
        assert name in str(err.value)


def test_bad_parameter_is_invalid_input() -> None:
    spec = get_method("integrated_gradients")
    with pytest.raises(InvalidInputError, match="n_steps"):
        spec.resolve_params({"steps": 4})
    with pytest.raises(InvalidInputError, match="int"):
        spec.resolve_params({"n_steps": "four"})


def test_docs_page_is_generated_from_the_registry() -> None:
    assert docs.DOC_PATH.read_text(encoding="utf-8") == docs.render(), (
        "docs/methods.md is stale: run `python -m service.engine.docs --write`"
    )
    for spec in SPECS:
        assert f"`{spec.name}`" in docs.render()
