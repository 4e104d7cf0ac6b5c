"""``VisualizeClass`` in the serving layer, on a real tiny model directory (pt2 + ONNX).

What is checked: every bad request fails with its domain error before any model call;
the same seed gives the same image and another seed another one; a repeated request is
answered from the cache with the same bytes and no model call; the deadline and a
cancellation stop the search between iterations; progress arrives every step with the
image every ``image_every`` steps; the reported probability is the model's on the PNG.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidInputError,
    ResourceLimitError,
    TargetOutOfRangeError,
)
from service.runtime.artifacts import load_bundle
from service.serving.visualize import ResultCache, Visualizer
from tests.serving.conftest import LABELS, SIZE

FAST = {"steps": "6", "crops": "2"}


@pytest.fixture(scope="module")
def visualizer(tiny_model_dir: Path) -> Visualizer:
    return Visualizer(load_bundle(tiny_model_dir))


def request(**fields: object) -> pb.VisualizeClassRequest:
    values: dict[str, object] = {"target": 1, "params": FAST, **fields}
    return pb.VisualizeClassRequest(**values)  # type: ignore[arg-type]


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


class Calls:
    """Counts the torch model's forwards (a forward hook; removed by ``close``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.count += 1

    def close(self) -> None:
        self.handle.remove()


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        ({"target": len(LABELS)}, TargetOutOfRangeError, "out of range"),
        ({"method": 99}, InvalidInputError, "unknown visualisation method number 99"),
        ({"params": {"steps": "0"}}, InvalidInputError, "'steps'"),
        ({"params": {"steps": "many"}}, InvalidInputError, "must be an integer"),
        ({"params": {"colour": "red"}}, InvalidInputError, "has no parameter 'colour'"),
        ({"params": {"noise": "nan"}}, InvalidInputError, "finite"),
        ({"params": {"steps": "4096", "crops": "64"}}, ResourceLimitError, "gradient rows"),
        ({"image_every": 100_000}, InvalidInputError, "image_every"),
    ],
)
def test_bad_requests_fail_before_any_model_call(
    visualizer: Visualizer, bad: dict[str, object], error: type[Exception], words: str
) -> None:
    calls = Calls(visualizer.bundle.engine.model)
    try:
        with pytest.raises(error) as raised:
            visualizer.visualize(request(**bad))
    finally:
        calls.close()
    assert words in str(raised.value)
    assert len(str(raised.value)) < 400
    assert calls.count == 0


def test_gradient_ascent_rejects_an_unknown_start(visualizer: Visualizer) -> None:
    bad = request(method=pb.VISUALIZATION_GRADIENT_ASCENT, params={"start": "zeros"})
    with pytest.raises(InvalidInputError, match="one of mean, random"):
        visualizer.visualize(bad)


@pytest.mark.parametrize("method", [pb.VISUALIZATION_MACO, pb.VISUALIZATION_GRADIENT_ASCENT])
def test_same_seed_same_image_other_seed_other_image(tiny_model_dir: Path, method: int) -> None:
    params = {"steps": "6"} | ({"crops": "2"} if method == pb.VISUALIZATION_MACO else {})
    if method == pb.VISUALIZATION_GRADIENT_ASCENT:
        params |= {"start": "random", "jitter": "2"}
    bundle = load_bundle(tiny_model_dir)
    first, again, other = (
        Visualizer(bundle).visualize(request(method=method, params=params, seed=seed))
        for seed in (7, 7, 8)
    )
    assert not (first.cached or again.cached or other.cached)  # three fresh searches
    # One level of 8-bit rounding is the only slack: same seed, same search.
    assert np.abs(pixels(first.png) - pixels(again.png)).max() <= 1
    assert np.abs(pixels(first.png) - pixels(other.png)).mean() > 5


def test_a_repeated_request_comes_from_the_cache_without_a_model_call(
    tiny_model_dir: Path,
) -> None:
    visualizer = Visualizer(load_bundle(tiny_model_dir))
    first = visualizer.visualize(request(seed=3))
    calls = Calls(visualizer.bundle.engine.model)
    try:
        second = visualizer.visualize(request(seed=3))
    finally:
        calls.close()
    assert (first.cached, second.cached) == (False, True)
    assert calls.count == 0 and visualizer.cache.hits == 1
    assert second.png == first.png
    assert second.transparency == first.transparency
    assert second.target_probability == first.target_probability
    assert [t.stage for t in second.timings] == ["total"]  # no search ran
    # Everything that determines the result is in the key: another seed, class or
    # parameter value is a fresh search.
    for changed in (
        request(seed=4),
        request(seed=3, target=2),
        request(seed=3, params={"steps": "5", "crops": "2"}),
    ):
        assert not visualizer.visualize(changed).cached


def test_the_cache_keeps_only_its_most_recent_entries() -> None:
    cache = ResultCache(entries=2)
    keys = [("v", target, "maco", None, 0) for target in range(3)]
    for key in keys:
        cache.put(key, b"x")  # type: ignore[arg-type]
    assert len(cache) == 2
    assert cache.get(keys[0]) is None  # type: ignore[arg-type]
    assert cache.get(keys[2]) == b"x"  # type: ignore[arg-type]


def test_the_reported_probability_is_the_models_on_the_returned_png(
    visualizer: Visualizer,
) -> None:
    response = visualizer.visualize(request(seed=5, target=2))
    image = torch.from_numpy(pixels(response.png).astype(np.float32) / 255.0).permute(2, 0, 1)
    assert tuple(image.shape) == SIZE
    with torch.no_grad():  # the torch module, not the ONNX forward the server used
        logits = visualizer.bundle.engine.model(image[None]).double()
    probability = torch.softmax(logits, dim=1)[0, 2].item()
    assert response.target_label == LABELS[2]
    assert response.target_probability == pytest.approx(probability, abs=1e-4)
    assert response.target_logit == pytest.approx(logits[0, 2].item(), abs=1e-3)
    assert response.params["steps"] == "6" and response.params["alpha"] == "1.0"
    assert response.model.version == "t1"
    assert response.transparency.width == SIZE[2] and response.transparency.value_max > 0


def test_progress_every_step_with_the_image_every_k_steps(visualizer: Visualizer) -> None:
    parts: list[pb.VisualizeClassProgress] = []
    visualizer.visualize(request(seed=11, image_every=3), progress=parts.append)
    assert [p.step for p in parts] == [1, 2, 3, 4, 5, 6]
    assert all(p.steps == 6 for p in parts)
    assert [p.step for p in parts if p.png] == [3, 6]
    assert pixels(parts[2].png).shape == (SIZE[1], SIZE[2], 3)


def test_a_passed_deadline_stops_the_search_after_one_iteration(visualizer: Visualizer) -> None:
    parts: list[pb.VisualizeClassProgress] = []
    with pytest.raises(DeadlineExceededError):
        visualizer.visualize(
            request(seed=12), deadline=time.monotonic() - 1.0, progress=parts.append
        )
    assert parts == []  # the check precedes the first report


def test_a_cancellation_stops_the_search_between_iterations(visualizer: Visualizer) -> None:
    parts: list[pb.VisualizeClassProgress] = []
    with pytest.raises(CancelledError):
        visualizer.visualize(
            request(seed=13), cancelled=lambda: len(parts) >= 2, progress=parts.append
        )
    assert [p.step for p in parts] == [1, 2]
    assert not visualizer.visualize(request(seed=13)).cached  # a stopped search is not cached
