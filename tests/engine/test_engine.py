"""Engine: freezing, validation, method checks, predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.engine import Engine
from service.engine.errors import (
    InvalidInputError,
    TargetOutOfRangeError,
    UnknownMethodError,
    UnsupportedMethodError,
)
from service.engine.registry import iter_methods
from service.engine.types import Attribution
from tests.engine.nets import NUM_CLASSES, SIZE, TinyCnn, images


def test_engine_freezes_the_model() -> None:
    model = TinyCnn().train()
    engine = Engine(model, input_shape=(3, SIZE, SIZE))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert engine.num_classes == NUM_CLASSES


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (torch.rand(2, 3, SIZE + 1, SIZE), r"\(batch, 3, 24, 24\)"),
        (torch.rand(3, SIZE, SIZE), r"\(batch, 3, 24, 24\)"),
        (torch.rand(2, 3, SIZE, SIZE).double(), "dtype"),
        (torch.rand(0, 3, SIZE, SIZE), "no image"),
        (torch.full((1, 3, SIZE, SIZE), 1.5), r"\[0, 1\]"),
        (torch.full((1, 3, SIZE, SIZE), float("nan")), "NaN"),
        (np.zeros((1, 3, SIZE, SIZE), np.float32), "tensor"),
    ],
)
def test_invalid_inputs_say_what_is_expected(
    tiny_engine: Engine, inputs: torch.Tensor, match: str
) -> None:
    with pytest.raises(InvalidInputError, match=match):
        tiny_engine.explain(inputs, None, "vanilla_gradient")


def test_unknown_method_names_the_known_ones(tiny_engine: Engine) -> None:
    with pytest.raises(UnknownMethodError, match=r"known: .*grad_cam.*vanilla_gradient"):
        tiny_engine.explain(images(1), None, "deconvnet")


@pytest.mark.parametrize(
    "params", [{"n_sample": 3}, {"n_samples": "many"}, {"n_samples": 2.5}, {"noise_level": "x"}]
)
def test_bad_parameters(tiny_engine: Engine, params: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        tiny_engine.explain(images(1), None, "smoothgrad", params)  # type: ignore[arg-type]


def test_parameters_given_as_strings_are_coerced(tiny_engine: Engine) -> None:
    a = tiny_engine.explain(images(1), [1], "smoothgrad", {"n_samples": "3"}).maps
    b = tiny_engine.explain(images(1), [1], "smoothgrad", {"n_samples": 3}).maps
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_target_out_of_range(tiny_engine: Engine) -> None:
    with pytest.raises(TargetOutOfRangeError, match=r"0\.\.4"):
        tiny_engine.explain(images(2), [1, NUM_CLASSES], "vanilla_gradient")
    with pytest.raises(TargetOutOfRangeError):
        tiny_engine.explain(images(1), torch.tensor([-1]), "vanilla_gradient")


def test_onnx_methods_need_a_numpy_forward(tiny_engine: Engine) -> None:
    onnx_methods = [spec.name for spec in iter_methods("onnx")]
    # The design's perturbation family is forward only: an empty list is a registry bug.
    assert {"occlusion", "rise", "sobol"} <= set(onnx_methods)
    for method in onnx_methods:
        with pytest.raises(UnsupportedMethodError, match="ONNX"):
            tiny_engine.explain(images(1), None, method)


def test_predict_logits_prefers_the_numpy_forward(tiny_engine: Engine) -> None:
    seen: list[tuple[int, ...]] = []

    def forward(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        return np.tile(np.arange(NUM_CLASSES, dtype=np.float64), (x.shape[0], 1))

    engine = Engine(tiny_engine.model, input_shape=(3, SIZE, SIZE), forward_numpy=forward)
    logits = engine.predict_logits(images(2))
    assert logits.dtype == torch.float32 and logits.shape == (2, NUM_CLASSES)
    assert seen[-1] == (2, 3, SIZE, SIZE)
    # The predicted class (the default target) comes from that forward.
    implicit = engine.explain(images(2), None, "vanilla_gradient").maps
    explicit = engine.explain(images(2), [NUM_CLASSES - 1] * 2, "vanilla_gradient").maps
    torch.testing.assert_close(implicit, explicit)
    torch.testing.assert_close(
        tiny_engine.predict_logits(images(2)), tiny_engine.model(images(2)).detach()
    )


def test_explicit_targets_skip_the_forward_pass(tiny_engine: Engine) -> None:
    calls: list[int] = []

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return np.zeros((len(x), NUM_CLASSES), np.float32)

    engine = Engine(tiny_engine.model, input_shape=(3, SIZE, SIZE), forward_numpy=forward)
    calls.clear()
    engine.explain(images(2), [1, 2], "vanilla_gradient")
    assert calls == []


def test_method_output_shape_is_checked(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine import registry

    spec = registry.get_method("vanilla_gradient")
    broken = type(spec)(**{**spec.__dict__, "fn": lambda ctx, x, t: Attribution(x[:, 0, :4])})
    monkeypatch.setitem(registry.METHODS._specs, "vanilla_gradient", broken)
    with pytest.raises(RuntimeError, match="shape"):
        tiny_engine.explain(images(1), [1], "vanilla_gradient")
