"""The contract every registered method, mask and score keeps, whatever its backend.

The members come from the registries, never from a list kept here: a new method, mask or
score is held to this contract as soon as it is registered, with its default parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.engine import Engine
from service.engine.registry import MASKS, METHODS, SCORES, MaskSpec, MethodSpec, ScoreSpec
from service.engine.scores import compute_scores
from service.engine.types import ExplainContext
from service.protocol.errors import DeadlineExceededError, InvalidInputError
from service.runtime.onnx_forward import OnnxForward
from tests.engine.nets import CNN_LAYER, SIZE, TinyCnn, cnn_methods, export_onnx, images

TARGETS = [1, 2, 3]
RUNNABLE = cnn_methods(METHODS.members())  # the attention methods: test_zoo_contract.py


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A model with both backends: torch for gradients, ONNX Runtime for forwards."""
    model = TinyCnn(seed=3)
    forward = export_onnx(model, tmp_path_factory.mktemp("contract") / "cnn.onnx", SIZE)
    return Engine(
        model,
        target_layer=CNN_LAYER,
        input_shape=(3, SIZE, SIZE),
        forward_numpy=forward,
        chunk_size=16,
    )


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    # Relative to the map's own scale: true on any machine, whatever the thread count.
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("spec", RUNNABLE, ids=[spec.name for spec in RUNNABLE])
def test_maps_are_finite_at_input_resolution(engine: Engine, spec: MethodSpec) -> None:
    result = engine.explain(images(3), TARGETS, spec.name, seed=5)
    assert result.maps.shape == (3, SIZE, SIZE) and result.maps.dtype == torch.float32
    assert bool(torch.isfinite(result.maps).all())


@pytest.mark.parametrize("spec", RUNNABLE, ids=[spec.name for spec in RUNNABLE])
def test_same_seed_same_maps(engine: Engine, spec: MethodSpec) -> None:
    first = engine.explain(images(3), TARGETS, spec.name, seed=5).maps
    close(engine.explain(images(3), TARGETS, spec.name, seed=5).maps, first)


@pytest.mark.parametrize("spec", RUNNABLE, ids=[spec.name for spec in RUNNABLE])
def test_a_batch_equals_its_items_alone(engine: Engine, spec: MethodSpec) -> None:
    x = images(3, seed=1)
    batch = engine.explain(x, TARGETS, spec.name, seed=9).maps
    for i, target in enumerate(TARGETS):
        close(engine.explain(x[i : i + 1], [target], spec.name, seed=9).maps[0], batch[i])


def counting_context(engine: Engine, deadline: float) -> tuple[ExplainContext, list[int]]:
    """A context over the engine's model and forward that counts every model evaluation."""
    calls: list[int] = []
    model = CountingModel(engine.model, calls)

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        assert engine.forward_numpy is not None
        return engine.forward_numpy(x)

    layer = engine.target_layer
    ctx = ExplainContext(
        model=model, forward_numpy=forward, target_layer=layer, deadline=deadline, chunk_size=1
    )
    return ctx, calls


class CountingModel(nn.Module):
    def __init__(self, model: nn.Module, calls: list[int], graded: list[int] | None = None):
        super().__init__()
        self.model = model
        self.calls = calls
        self.graded = graded  # rows evaluated with autograd on, when given

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.graded is not None and torch.is_grad_enabled():
            self.graded.append(len(x))
        else:
            self.calls.append(len(x))
        return self.model(x)


@pytest.mark.parametrize("spec", RUNNABLE, ids=[spec.name for spec in RUNNABLE])
def test_the_cost_counts_the_rows_the_method_evaluates(engine: Engine, spec: MethodSpec) -> None:
    """What the budget is checked against is what the method does: forward-only rows
    (ONNX Runtime, or torch without autograd) and gradient rows, counted at the model."""
    forwards: list[int] = []
    gradient_rows: list[int] = []
    ctx, _ = counting_context(engine, deadline=time.monotonic() + 3600.0)
    ctx.model = CountingModel(engine.model, forwards, gradient_rows)
    assert engine.forward_numpy is not None
    ctx.forward_numpy = counted(engine.forward_numpy, forwards)
    ctx.chunk_size = 64
    params = spec.resolve_params(None, engine.input_shape)
    if "tolerance" in params:
        # The stated cost is the worst case of a method that stops once its map is stable
        # (RISE, Sobol): the ceiling, reached when it never stops early.
        params = spec.resolve_params({"tolerance": 0.0}, engine.input_shape)
    spec.fn(ctx, images(2), torch.tensor(TARGETS[:2]), **params)
    cost = spec.cost(params, engine.input_shape)
    assert (sum(forwards), sum(gradient_rows)) == (2 * cost.forwards, 2 * cost.backward_rows)
    assert cost.memory_bytes > 0


@pytest.mark.parametrize("spec", RUNNABLE, ids=[spec.name for spec in RUNNABLE])
def test_a_passed_deadline_stops_before_any_model_work(engine: Engine, spec: MethodSpec) -> None:
    ctx, calls = counting_context(engine, deadline=time.monotonic() - 1.0)
    params = spec.resolve_params(None, engine.input_shape)
    with pytest.raises(DeadlineExceededError):
        spec.fn(ctx, images(2), torch.tensor(TARGETS[:2]), **params)
    assert calls == []


@pytest.mark.parametrize("spec", RUNNABLE, ids=[spec.name for spec in RUNNABLE])
def test_a_deadline_passing_mid_way_stops_at_the_next_chunk(
    engine: Engine, spec: MethodSpec
) -> None:
    ctx, calls = counting_context(engine, deadline=time.monotonic() + 3600.0)

    def expire_after_first_call(module: nn.Module, args: object, output: object) -> None:
        ctx.deadline = time.monotonic() - 1.0

    assert isinstance(ctx.model, CountingModel)
    hook = ctx.model.register_forward_hook(expire_after_first_call)
    forward = ctx.forward_numpy
    assert forward is not None

    def expiring_forward(x: np.ndarray) -> np.ndarray:
        out = forward(x)
        ctx.deadline = time.monotonic() - 1.0
        return out

    ctx.forward_numpy = expiring_forward
    params = spec.resolve_params(None, engine.input_shape)
    try:
        with pytest.raises(DeadlineExceededError):
            spec.fn(ctx, images(2), torch.tensor(TARGETS[:2]), **params)
    finally:
        hook.remove()
    assert calls == [1], "one chunk of one row ran, then the deadline stopped the rest"


# --- masks -----------------------------------------------------------------------------


def scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    saliency = rng.random((40, 30))
    saliency[10:25, 8:20] += 2.0  # a salient block
    image[10:25, 8:20] = (250, 220, 30)
    return image, saliency


@pytest.mark.parametrize("spec", MASKS.members(), ids=MASKS.names())
def test_a_mask_is_none_or_boolean_at_the_map_size_and_deterministic(spec: MaskSpec) -> None:
    image, saliency = scene()
    first = spec.fn(image, saliency, **spec.defaults)
    second = spec.fn(image.copy(), saliency.copy(), **spec.defaults)
    if first is None:
        assert second is None
        return
    assert first.dtype == bool and first.shape == saliency.shape
    np.testing.assert_array_equal(first, second)
    assert first[10:25, 8:20].mean() > first.mean()  # the salient block is in it
    with pytest.raises(InvalidInputError):
        spec.fn(image, np.full(saliency.shape, np.nan), **spec.defaults)


@pytest.mark.parametrize("spec", MASKS.members(), ids=MASKS.names())
def test_a_constant_map_gives_no_foreground(spec: MaskSpec) -> None:
    image, saliency = scene()
    mask = spec.fn(image, np.full(saliency.shape, 0.25), **spec.defaults)
    assert mask is None or not mask.any()


# --- scores ----------------------------------------------------------------------------

REGION = (slice(8, 20), slice(12, 24))


class RegionModel(nn.Module):
    """Class 0's logit grows with the mean of one region: the perfect map is that region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3))
        return torch.stack([20.0 * (region - 0.7), torch.zeros_like(region)], dim=1)


def region_method(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The method whose maps are the perfect ones: the region's channel mean, 0 elsewhere.
    Scores that re-run the scored method (stability) get this one."""
    maps = np.zeros((len(images), *images.shape[2:]), dtype=np.float32)
    maps[:, REGION[0], REGION[1]] = images[:, :, REGION[0], REGION[1]].mean(axis=1)
    return maps


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxForward, np.ndarray, ...]:
    forward = export_onnx(RegionModel(), Path(tmp_path_factory.mktemp("region")) / "r.onnx", 32)
    rng = np.random.default_rng(0)
    pictures = rng.uniform(0.0, 0.3, (3, 3, 32, 32)).astype(np.float32)
    pictures[:, :, REGION[0], REGION[1]] = rng.uniform(0.7, 1.0, (3, 3, 12, 12))
    perfect = region_method(pictures, np.zeros(3, dtype=np.int64))
    random = rng.uniform(0.0, 1.0, (3, 32, 32)).astype(np.float32)
    return forward, pictures, perfect, random, np.zeros(3, dtype=np.int64)


def counted(forward: Callable[..., np.ndarray], calls: list[int]) -> Callable[..., np.ndarray]:
    def wrapper(x: np.ndarray, *rest: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return forward(x, *rest)

    return wrapper


@pytest.mark.parametrize("spec", SCORES.members(), ids=SCORES.names())
def test_a_score_is_finite_per_image_and_batch_independent(
    region: tuple[object, ...], spec: ScoreSpec
) -> None:
    forward, pictures, _, random, targets = region
    names, method = [spec.name], region_method
    score = compute_scores(
        forward, pictures, random, targets, names, seed=4, chunk_size=7, explain=method
    )
    values = score[spec.name]
    assert values.shape == (3,) and values.dtype == np.float64 and np.isfinite(values).all()
    again = compute_scores(
        forward, pictures, random, targets, names, seed=4, chunk_size=64, explain=method
    )
    np.testing.assert_allclose(again[spec.name], values, rtol=1e-6, atol=1e-9)
    for i in range(3):
        one = slice(i, i + 1)
        alone = compute_scores(
            forward, pictures[one], random[one], targets[one], names, seed=4, explain=method
        )
        np.testing.assert_allclose(alone[spec.name][0], values[i], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("spec", SCORES.members(), ids=SCORES.names())
def test_the_perfect_map_wins_in_the_declared_direction(
    region: tuple[object, ...], spec: ScoreSpec
) -> None:
    forward, pictures, perfect, random, targets = region
    good = compute_scores(forward, pictures, perfect, targets, [spec.name], explain=region_method)
    bad = compute_scores(forward, pictures, random, targets, [spec.name], explain=region_method)
    good, bad = good[spec.name], bad[spec.name]
    if spec.higher_is_better:
        assert (good > bad).all(), (good, bad)
    else:
        assert (good < bad).all(), (good, bad)


@pytest.mark.parametrize("spec", SCORES.members(), ids=SCORES.names())
def test_the_cost_counts_the_forwards_of_a_score(
    region: tuple[object, ...], spec: ScoreSpec
) -> None:
    forward, pictures, _, random, targets = region
    calls: list[int] = []
    explain = counted(region_method, explained := [])
    names = [spec.name]
    compute_scores(counted(forward, calls), pictures, random, targets, names, explain=explain)
    cost = spec.cost(spec.defaults, pictures.shape[1:])
    # A score's re-explanations are billed to the method, reexplains() times per map.
    reruns = spec.reexplains(spec.defaults) if spec.reexplains is not None else 0
    assert sum(explained) == len(pictures) * reruns
    assert sum(calls) == len(pictures) * cost.forwards and cost.backward_rows == 0
    assert cost.memory_bytes > 0


@pytest.mark.parametrize("spec", SCORES.members(), ids=SCORES.names())
def test_a_passed_deadline_stops_a_score_before_any_forward(
    region: tuple[object, ...], spec: ScoreSpec
) -> None:
    forward, pictures, _, random, targets = region
    calls: list[int] = []

    def passed() -> None:
        raise DeadlineExceededError("deadline exceeded")

    with pytest.raises(DeadlineExceededError):
        compute_scores(
            counted(forward, calls),
            pictures,
            random,
            targets,
            [spec.name],
            check=passed,
            explain=counted(region_method, calls),
        )
    assert calls == []
