"""Contract checks every torch-backend method of the registry must pass.

The methods come from the registry, not from a list kept here: a new gradient method is
checked as soon as it is registered.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.engine.engine import Engine
from service.engine.errors import DeadlineExceededError, UnsupportedMethodError
from service.engine.registry import MethodSpec, ParamValue, iter_methods
from service.engine.types import ExplainContext
from tests.engine.nets import CNN_LAYER, SIZE, TinyCnn, all_hooks, cnn_methods, images

TORCH_METHODS = [spec.name for spec in cnn_methods(iter_methods("torch"))]
# Cheap but non-trivial parameters, so that the whole matrix stays fast.
FAST: dict[str, ParamValue] = {"n_samples": 4, "n_steps": 4}


def fast_params(spec: MethodSpec) -> dict[str, ParamValue]:
    return {k: v for k, v in FAST.items() if k in spec.defaults}


def is_noisy(spec: MethodSpec) -> bool:
    return "n_samples" in spec.defaults


@pytest.fixture(scope="module", params=TORCH_METHODS)
def spec(request: pytest.FixtureRequest) -> MethodSpec:
    from service.engine.registry import get_method

    return get_method(request.param)


def test_torch_methods_are_registered() -> None:
    expected = {
        "vanilla_gradient",
        "gradient_x_input",
        "smoothgrad",
        "smoothgrad_sq",
        "vargrad",
        "integrated_gradients",
        "grad_cam",
        "grad_cam_pp",
    }
    assert expected <= set(TORCH_METHODS)


def test_shape_finite_and_deterministic(tiny_engine: Engine, spec: MethodSpec) -> None:
    x = images(3)
    params = fast_params(spec)
    first = tiny_engine.explain(x, [1, 2, 3], spec.name, params, seed=5)
    again = tiny_engine.explain(x, [1, 2, 3], spec.name, params, seed=5)
    assert first.maps.shape == (3, SIZE, SIZE)
    assert first.maps.dtype == torch.float32
    assert torch.isfinite(first.maps).all()
    assert first.maps.abs().amax(dim=(1, 2)).min() > 0  # not all zero
    torch.testing.assert_close(first.maps, again.maps, rtol=0, atol=0)
    other_seed = tiny_engine.explain(x, [1, 2, 3], spec.name, params, seed=6)
    if is_noisy(spec) and not spec.needs_layer:
        assert not torch.allclose(first.maps, other_seed.maps)
    elif is_noisy(spec):
        # Noise reaches a CAM map only through d logit / d layer, which a layer followed by
        # pooling and a linear head (this CNN's) has constant: the seed changes nothing.
        # test_smooth_grad_cam_pp.py checks the seed and the noise on a deeper layer.
        torch.testing.assert_close(first.maps, other_seed.maps)
    else:
        torch.testing.assert_close(first.maps, other_seed.maps, rtol=0, atol=0)


def test_mixed_targets_equal_per_item_runs(tiny_engine: Engine, spec: MethodSpec) -> None:
    x = images(3, seed=7)
    targets = [4, 1, 2]
    params = fast_params(spec)
    batch = tiny_engine.explain(x, targets, spec.name, params, seed=3).maps
    for i, target in enumerate(targets):
        alone = tiny_engine.explain(x[i : i + 1], [target], spec.name, params, seed=3).maps
        scale = float(batch[i].abs().max())
        torch.testing.assert_close(alone[0], batch[i], rtol=1e-4, atol=1e-6 * scale)
    # ... and the target matters.
    swapped = tiny_engine.explain(x, [1, 2, 4], spec.name, params, seed=3).maps
    assert not torch.allclose(swapped, batch)


def test_default_target_is_the_predicted_class(tiny_engine: Engine, spec: MethodSpec) -> None:
    x = images(2, seed=8)
    predicted = tiny_engine.predict_logits(x).argmax(dim=1)
    assert (predicted != 0).all()  # class 0 is never predicted by TinyCnn
    params = fast_params(spec)
    implicit = tiny_engine.explain(x, None, spec.name, params).maps
    partial = tiny_engine.explain(x, [None, int(predicted[1])], spec.name, params).maps
    explicit = tiny_engine.explain(x, predicted, spec.name, params).maps
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    torch.testing.assert_close(partial, explicit, rtol=0, atol=0)


def test_no_hooks_left_and_no_parameter_gradients(spec: MethodSpec) -> None:
    model = TinyCnn()
    engine = Engine(model, target_layer=CNN_LAYER, input_shape=(3, SIZE, SIZE))
    with torch.no_grad():  # the engine must switch grad mode on itself
        engine.explain(images(2), None, spec.name, fast_params(spec))
    assert all_hooks(model) == []
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())

    model.explode = True  # now the forward raises after the CAM layer ran
    with pytest.raises(RuntimeError, match="after the target layer"):
        engine.explain(images(2), [1, 2], spec.name, fast_params(spec))
    assert all_hooks(model) == []
    assert all(p.grad is None for p in model.parameters())


def test_inputs_are_not_modified(tiny_engine: Engine, spec: MethodSpec) -> None:
    x = images(2)
    before = x.clone()
    tiny_engine.explain(x, None, spec.name, fast_params(spec))
    assert torch.equal(x, before) and not x.requires_grad


def test_deadline_stops_the_work(tiny_engine: Engine, spec: MethodSpec) -> None:
    with pytest.raises(DeadlineExceededError):
        tiny_engine.explain(images(1), [1], spec.name, deadline=time.monotonic() - 1)
    # The method itself checks between chunks, not only the engine before starting.
    ctx = ExplainContext(
        model=tiny_engine.model,
        target_layer=tiny_engine.target_layer,
        deadline=time.monotonic() - 1,
    )
    with pytest.raises(DeadlineExceededError):
        spec.fn(ctx, images(1), torch.tensor([1]), **spec.resolve_params(fast_params(spec)))


def test_concurrent_calls_match_sequential(tiny_engine: Engine, spec: MethodSpec) -> None:
    batches = [images(2, seed=s) for s in range(6)]
    targets = [[1 + s % 4, 1 + (s + 1) % 4] for s in range(6)]
    params = fast_params(spec)

    def run(i: int) -> torch.Tensor:
        return tiny_engine.explain(batches[i], targets[i], spec.name, params, seed=i).maps

    sequential = [run(i) for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        parallel = list(pool.map(run, range(6)))
    for got, want in zip(parallel, sequential, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert all_hooks(tiny_engine.model) == []


def test_layer_methods_need_a_layer(spec: MethodSpec) -> None:
    engine = Engine(TinyCnn(), input_shape=(3, SIZE, SIZE))  # no target layer
    if spec.needs_layer:
        with pytest.raises(UnsupportedMethodError, match="layer"):
            engine.explain(images(1), [1], spec.name)
    else:
        engine.explain(images(1), [1], spec.name, fast_params(spec))
