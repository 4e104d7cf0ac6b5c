"""The method contract on every zoo architecture, for every method that architecture can run.

Registry-driven: every registered method against every tiny zoo model (ResNet-18/50,
EfficientNet-B0-style, ConvNeXt-T-style, ViT-S/16 on ``nn.TransformerEncoderLayer``, ViT
with SDPA and register tokens), CAM layer and attention found as ``archive`` finds them.
A method an architecture cannot run must say why (``unavailable_reason``), and every
method must run on at least one architecture. Where it runs: finite maps at input
resolution, the same seed giving the same maps, a batch with mixed targets equal to its
items alone, the predicted class as the default target, nothing left behind (hooks,
attention captures), also when the model raises, and a passed deadline stopping it before
any model work. Counts are cheap (:func:`tests.engine.zoo_cases.cheap_params`): the
properties do not depend on them.
"""

from __future__ import annotations

import time

import pytest
import torch

from service.engine.engine import Engine
from service.engine.errors import DeadlineExceededError, UnsupportedMethodError
from service.engine.registry import METHODS, MethodSpec
from service.models.zoo import ZOO
from tests.engine.nets import all_hooks
from tests.engine.zoo_cases import SIZE, cheap_params, zoo_engine

TARGETS = [1, 3]
ATTENTION_ARCHITECTURES = {"vit_s16", "vit_s16_sdpa_reg4"}
# What each architecture runs: every method, but the attention ones on the transformers
# only (test_every_method_runs_on_some_architecture asserts exactly this).
CASES = [
    pytest.param(name, spec, id=f"{name}-{spec.name}")
    for name in ZOO
    for spec in METHODS.members()
    if not spec.needs_attention or name in ATTENTION_ARCHITECTURES
]
_ENGINES: dict[str, Engine] = {}


def engine_of(name: str) -> Engine:
    """One engine per architecture for the whole module."""
    if name not in _ENGINES:
        _ENGINES[name] = zoo_engine(name)
    return _ENGINES[name]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, logits: float = 0.0) -> None:
    """Equal up to rounding: relative to the map's own scale, and -- for maps made of logit
    differences (forward-only methods, ``logits`` = the largest |logit|) -- to what float32
    rounding of the logits leaves of a difference. True whatever the thread count."""
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=max(1e-5 * scale, 1e-6 * logits))


def logit_scale(engine: Engine, spec: MethodSpec, x: torch.Tensor) -> float:
    """The largest |logit| of ``x`` for a forward-only method's maps; 0 for the others."""
    return float(engine.predict_logits(x).abs().max()) if spec.forward_only else 0.0


def test_every_method_runs_on_some_architecture() -> None:
    available: dict[str, set[str]] = {name: set() for name in METHODS.names()}
    for name in ZOO:
        engine = engine_of(name)
        for spec in METHODS.members():
            if engine.unavailable_reason(spec) is None:
                available[spec.name].add(name)
    assert all(available.values()), {m: a for m, a in available.items() if not a}
    for spec in METHODS.members():
        if spec.needs_attention:  # exactly the transformers
            assert available[spec.name] == ATTENTION_ARCHITECTURES, spec.name
        else:
            assert available[spec.name] == set(ZOO), spec.name


@pytest.mark.parametrize("name", sorted(set(ZOO) - ATTENTION_ARCHITECTURES))
@pytest.mark.parametrize(
    "spec", [s for s in METHODS.members() if s.needs_attention], ids=lambda s: s.name
)
def test_what_an_architecture_cannot_run_it_says_why(name: str, spec: MethodSpec) -> None:
    engine = engine_of(name)
    reason = engine.unavailable_reason(spec)
    assert reason is not None and "no attention layers" in reason
    with pytest.raises(UnsupportedMethodError, match="no attention layers"):
        engine.explain(images(1), [1], spec.name, cheap_params(spec))


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_maps_deterministic_and_the_default_target_is_the_prediction(
    name: str, spec: MethodSpec
) -> None:
    engine = engine_of(name)
    x, params = images(2, seed=1), cheap_params(spec)
    predicted = engine.predict_logits(x).argmax(dim=1)
    implicit = engine.explain(x, None, spec.name, params, seed=5).maps
    assert implicit.shape == (2, SIZE, SIZE) and implicit.dtype == torch.float32
    assert bool(torch.isfinite(implicit).all())
    logits = logit_scale(engine, spec, x)
    close(engine.explain(x, predicted, spec.name, params, seed=5).maps, implicit, logits)
    close(engine.explain(x, None, spec.name, params, seed=5).maps, implicit, logits)


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_a_batch_with_mixed_targets_equals_its_items_alone(name: str, spec: MethodSpec) -> None:
    engine = engine_of(name)
    x, params = images(2, seed=2), cheap_params(spec)
    batch = engine.explain(x, TARGETS, spec.name, params, seed=9).maps
    logits = logit_scale(engine, spec, x)
    for i, target in enumerate(TARGETS):
        alone = engine.explain(x[i : i + 1], [target], spec.name, params, seed=9).maps[0]
        close(alone, batch[i], logits)


class Failure(RuntimeError):
    pass


def raise_after(_module: torch.nn.Module, _args: object, _output: object) -> None:
    raise Failure("the model failed after its last layer")


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_nothing_is_left_behind_also_when_the_model_raises(name: str, spec: MethodSpec) -> None:
    engine = engine_of(name)
    model, params = engine.model, cheap_params(spec)
    with torch.no_grad():  # the engine switches grad mode on itself where it needs it
        engine.explain(images(1), [2], spec.name, params)
    assert all_hooks(model) == [] and not torch._C._is_torch_function_mode_enabled()
    if spec.backend != "torch":
        return
    # Every layer, the CAM layer and the attention included, has run when this raises.
    handle = model.model.register_forward_hook(raise_after)
    try:
        with pytest.raises(Failure):
            engine.explain(images(1), [2], spec.name, params)
    finally:
        handle.remove()
    assert all_hooks(model) == [] and not torch._C._is_torch_function_mode_enabled()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_a_passed_deadline_stops_before_any_model_work(name: str, spec: MethodSpec) -> None:
    engine = engine_of(name)
    calls: list[int] = []
    handle = engine.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(DeadlineExceededError):
            engine.explain(
                images(1), [1], spec.name, cheap_params(spec), deadline=time.monotonic() - 1
            )
    finally:
        handle.remove()
    assert calls == []
