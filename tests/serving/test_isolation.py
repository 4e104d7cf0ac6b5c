"""No request can hurt another: shared work that fails is retried member by member.

Faults are injected into real registered members (swapped in the registry for the test)
and the real forward, and fire only for a poisoned image: an all-white one. The other
requests of its batch must get exactly what they get alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.registry import METHODS, SCORES
from service.protocol.errors import INTERNAL_MESSAGE, InvalidInputError
from service.serving.pipeline import Explainer
from tests.serving.test_pipeline import png, request

POISON = np.full((20, 30, 3), 255, dtype=np.uint8)


def poisoned(req: pb.ExplainRequest) -> pb.ExplainRequest:
    req.image.encoded = png(POISON)
    return req


def is_poison(images: Any) -> bool:
    return bool(np.asarray(images).reshape(len(images), -1).min(axis=1).max() == 1.0)


def inject(
    monkeypatch: pytest.MonkeyPatch, registry: Any, name: str, error: Exception
) -> list[int]:
    """Swap ``name``'s function for one that raises ``error`` on a batch holding the poison;
    returns the batch sizes it was called with."""
    spec = registry.get(name)
    calls: list[int] = []

    def fn(ctx: object, images: Any, *rest: Any, **params: Any) -> Any:
        calls.append(len(images))
        if is_poison(images):
            raise error
        return spec.fn(ctx, images, *rest, **params)

    fn.__name__ = spec.fn.__name__
    monkeypatch.setitem(registry._specs, name, dataclasses.replace(spec, fn=fn))
    return calls


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (RuntimeError("cannot convert float infinity to integer"), "INTERNAL", INTERNAL_MESSAGE),
        (InvalidInputError("this image cannot be explained"), "INVALID_ARGUMENT", "this image"),
    ],
)
def test_a_method_failing_on_one_input_fails_only_that_request(
    explainer: Explainer,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    code: str,
    message: str,
) -> None:
    [alone] = explainer.explain_batch([request("smoothgrad", seed=2)])
    calls = inject(monkeypatch, METHODS, "smoothgrad", error)
    good, bad = request("smoothgrad", seed=2), poisoned(request("smoothgrad", seed=2))
    replies = explainer.explain_batch([good, bad, good])
    assert [r.error.code for r in replies] == ["", code, ""]
    assert replies[1].error.message.startswith(message)  # never the bug's own text
    assert calls == [3, 1, 1, 1]  # the group, then each member alone
    for reply in (replies[0], replies[2]):
        assert reply.explanations[0].map.data == alone.explanations[0].map.data


def test_a_score_failing_on_one_map_fails_only_that_request(
    explainer: Explainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = inject(monkeypatch, SCORES, "deletion_auc", RuntimeError("index out of bounds"))
    scored = [pb.SCORE_DELETION_AUC]
    good = request("vanilla_gradient", scores=scored)
    replies = explainer.explain_batch([good, poisoned(request("vanilla_gradient", scores=scored))])
    assert [r.error.code for r in replies] == ["", "INTERNAL"]
    assert calls == [2, 1, 1]
    assert len(replies[0].explanations[0].scores) == 1


def test_a_forward_failing_on_one_input_fails_only_that_request(
    explainer: Explainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = explainer.bundle.forward
    sizes: list[int] = []

    def fragile(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        if is_poison(batch):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")
        return forward(batch)

    monkeypatch.setattr(explainer.bundle, "forward", fragile)
    replies = explainer.explain_batch(
        [request("rise"), poisoned(request("rise")), request("vanilla_gradient")]
    )
    assert [r.error.code for r in replies] == ["", "INTERNAL", ""]
    assert replies[1].error.message == INTERNAL_MESSAGE
    assert sizes[:4] == [3, 1, 1, 1]  # then RISE's own forwards
    predict = explainer.predict_batch(
        [pb.PredictRequest(image=pb.Image(encoded=data)) for data in (png(POISON), png())]
    )
    assert [p.error.code for p in predict] == ["INTERNAL", ""]


def test_a_mask_failing_on_one_map_fails_only_that_request(
    explainer: Explainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine.registry import MASKS

    spec = MASKS.get("threshold")

    def fragile(image: np.ndarray, saliency: np.ndarray, **params: Any) -> Any:
        if image.min() == 255:
            raise ValueError("mask failed")
        return spec.fn(image, saliency, **params)

    monkeypatch.setitem(MASKS._specs, "threshold", dataclasses.replace(spec, fn=fragile))
    replies = explainer.explain_batch(
        [poisoned(request("vanilla_gradient")), request("vanilla_gradient")]
    )
    assert [r.error.code for r in replies] == ["INTERNAL", ""]
    assert replies[1].explanations[0].HasField("mask")


def test_when_every_member_stopped_nobody_is_retried(
    explainer: Explainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = inject(monkeypatch, METHODS, "rise", RuntimeError("never reached"))
    jobs = explainer.jobs([request("rise"), request("rise")])
    for job in jobs:
        job.cancelled = lambda: True
    done = [e.message for e in explainer.run(jobs) if e.kind == "done"]
    assert [d.error.code for d in done] == ["CANCELLED", "CANCELLED"]  # type: ignore[union-attr]
    assert calls == []
