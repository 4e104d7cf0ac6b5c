"""The stability scores through the pipeline: the pipeline hands them the group's method,
with the request's parameters and seed."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.scores import compute_scores
from service.protocol.errors import ResourceLimitError
from service.protocol.limits import Limits
from service.protocol.names import METHODS
from service.protocol.request import ExplainQuery
from service.serving.pipeline import Explainer
from service.serving.plan import plan

PICTURE = np.random.default_rng(5).integers(0, 255, (40, 36, 3), dtype=np.uint8)
STABILITY = [pb.SCORE_MAX_SENSITIVITY, pb.SCORE_RANK_STABILITY]


def stable_request(method: str, params: dict[str, str], seed: int) -> pb.ExplainRequest:
    buffer = io.BytesIO()
    Image.fromarray(PICTURE).save(buffer, format="PNG")
    req = pb.ExplainRequest(image=pb.Image(encoded=buffer.getvalue()), seed=seed, top_k=1)
    req.methods.append(pb.MethodRequest(method=METHODS.number(method), params=params))
    req.scores.extend(STABILITY)
    return req


def engine_scores(
    explainer: Explainer, job_input: np.ndarray, target: int, params: dict[str, str], seed: int
) -> dict[str, np.ndarray]:
    """The same scores, computed here with the engine called directly."""
    engine = explainer.bundle.engine

    def method(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        maps = engine.explain(torch.from_numpy(images), targets, "smoothgrad", params, seed=seed)
        return maps.maps.numpy()

    images = job_input[None]
    maps = method(images, np.array([target]))
    names = ["max_sensitivity", "rank_stability"]
    targets = np.array([target])
    return compute_scores(explainer.bundle.forward, images, maps, targets, names, seed=seed,
                          explain=method)  # fmt: skip


def test_stability_scores_re_run_the_requests_method_params_and_seed(
    explainer: Explainer,
) -> None:
    params = {"n_samples": "3"}
    [job] = explainer.jobs([stable_request("smoothgrad", params, seed=17)])
    events = list(explainer.run([job]))
    assert events[-1].kind == "done" and job.error is None
    [explanation] = job.explanations
    got = {s.score: s.value for s in explanation.scores}
    assert set(got) == set(STABILITY)
    assert job.model_input is not None
    expected = engine_scores(explainer, job.model_input, explanation.target, params, seed=17)
    # The pipeline's scores are float32 on the wire.
    np.testing.assert_allclose(got[pb.SCORE_MAX_SENSITIVITY], expected["max_sensitivity"], 1e-5)
    np.testing.assert_allclose(got[pb.SCORE_RANK_STABILITY], expected["rank_stability"], 1e-5)
    # ... and the seed is part of what must match: SmoothGrad's noise differs with another.
    other = engine_scores(explainer, job.model_input, explanation.target, params, seed=18)
    assert abs(other["max_sensitivity"][0] - got[pb.SCORE_MAX_SENSITIVITY]) > 1e-3


def test_planning_bills_the_re_explanations_once_for_both_scores(explainer: Explainer) -> None:
    """SmoothGrad with 4 samples costs 4 gradient rows per target; the stability pass
    (shared by both scores) explains each of the 2 maps 8 more times: 2 x (4 + 8 x 4)."""
    req = stable_request("smoothgrad", {"n_samples": "4"}, seed=1)
    req.top_k = 2
    query = ExplainQuery.from_pb(req)
    engine = explainer.bundle.engine
    planned = plan(query, engine, engine.num_classes, Limits())
    assert planned.cost.backward_rows == 2 * (4 + 8 * 4)
    assert planned.cost.forwards == 0


def test_stability_can_take_a_request_over_the_budget(explainer: Explainer) -> None:
    """RISE with 8,192 masks fits the 65,536-forward budget alone, not re-run 8 times."""
    alone = stable_request("rise", {"n_masks": "8192"}, seed=1)
    del alone.scores[:]
    stable = stable_request("rise", {"n_masks": "8192"}, seed=1)
    engine = explainer.bundle.engine
    limits = Limits()
    plan(ExplainQuery.from_pb(alone), engine, engine.num_classes, limits)
    with pytest.raises(ResourceLimitError, match="re-run by the stability scores"):
        plan(ExplainQuery.from_pb(stable), engine, engine.num_classes, limits)
