"""Anytime maps in the pipeline: each streaming item gets its own maps so far, rate-limited.

The coarse map is checked against Captum's occlusion of the coarse windows on a float64
copy of the served network; routing, the rate limit and stopping use synthetic progress
reports, so that what each job receives is known by construction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import Occlusion

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.decode import decode_map
from service.engine.types import Progress
from service.protocol.events import EventKind, event_kind, stream_part
from service.protocol.names import METHODS
from service.serving import codec, execute
from service.serving.jobs import Event, Job
from service.serving.pipeline import Explainer
from service.serving.refine import Refinements, reporter
from tests.serving.conftest import LABELS, SIZE
from tests.serving.test_pipeline import png
from tests.serving.tiny_net import TinyNet

# The model's own size: no resize between the engine's map and the wire's.
PICTURE = np.random.default_rng(5).integers(0, 255, (32, 32, 3), dtype=np.uint8)
# Fine windows 8 px every 4 (7 x 7 = 49); coarse ones 16 px every 8: 3 x 3 = 9.
OCCLUSION = {"window": "8", "stride": "4", "coarse": "2"}
COARSE_FORWARDS = 1 + 9  # the unoccluded image, then every coarse window
TOTAL_FORWARDS = 1 + 9 + 8  # and the best ceil(0.15 * 49) = 8 fine windows


def occlusion_request(**fields: object) -> pb.ExplainRequest:
    req = pb.ExplainRequest(
        image=pb.Image(encoded=png(PICTURE)), map_encoding=pb.MAP_ENCODING_FLOAT16, seed=4
    )
    for name, value in fields.items():
        if name == "target_classes":
            req.target_classes.extend(value)  # type: ignore[call-overload]
        else:
            setattr(req, name, value)
    req.methods.append(pb.MethodRequest(method=METHODS.number("occlusion"), params=OCCLUSION))  # type: ignore[arg-type]
    return req


def coarse_reference(model_dir: Path, target: int) -> np.ndarray:
    """Captum's occlusion with the coarse windows, scaled by the fine/coarse area ratio
    (a coarse window removes 4 times what a fine one does), in float64."""
    net = TinyNet(len(LABELS)).double().eval()
    net.load_state_dict(torch.load(model_dir / "weights.pt", weights_only=True))
    model = torch.nn.Sequential()
    model.forward = lambda x: net((x - 0.5) / 0.25)  # type: ignore[method-assign]
    x = torch.from_numpy(codec.to_model_input(PICTURE, *SIZE[1:])).double()[None]
    attr = Occlusion(model).attribute(
        x, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0.5, target=target
    )
    return attr[0, 0].numpy() * (8 * 8) / (16 * 16)


def close_in_float16(actual: np.ndarray, expected: np.ndarray) -> None:
    # float16 on the wire (2^-11 relative), float32 ONNX Runtime against float64 here.
    atol = 1e-3 * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=2.0**-9, atol=atol)


def test_a_refinement_event_travels_as_the_refinement_part() -> None:
    message = pb.Refinement(method=METHODS.number("rise"), target=2, forwards=32)  # type: ignore[arg-type]
    part = stream_part(EventKind.REFINEMENT, message)
    assert part.WhichOneof("part") == "refinement"
    assert event_kind(part) is EventKind.REFINEMENT
    assert part.refinement == message


def test_a_stream_gets_the_coarse_map_first_and_the_same_final_map(
    explainer: Explainer, tiny_model_dir: Path
) -> None:
    seen: list[Event] = []
    [job] = explainer.jobs([occlusion_request()])
    job.refinements = Refinements(send=seen.append)
    seen.extend(explainer.run([job]))
    kinds = [event.kind for event in seen]
    assert kinds == ["prediction", "refinement", "explanation", "done"]
    refinement, explanation = seen[1].message, seen[2].message
    assert isinstance(refinement, pb.Refinement) and isinstance(explanation, pb.Explanation)
    assert (refinement.method, refinement.target) == (explanation.method, explanation.target)
    assert refinement.params == explanation.params
    assert (refinement.forwards, refinement.forwards_total) == (COARSE_FORWARDS, TOTAL_FORWARDS)
    assert refinement.map.encoding == pb.MAP_ENCODING_FLOAT16
    reference = coarse_reference(tiny_model_dir, job.work[0].target)
    close_in_float16(decode_map(refinement.map), reference)
    # Reporting changes nothing: the unary answer, same seed, is the same map.
    [unary] = explainer.explain_batch([occlusion_request()])
    assert unary.explanations[0].map == explanation.map
    assert any(t.stage == "refine" for t in seen[-1].message.timings)  # type: ignore[union-attr]


def planned(explainer: Explainer, requests: list[pb.ExplainRequest]) -> list[Job]:
    """Jobs decoded, predicted and planned: the pipeline up to its first engine call."""
    jobs = explainer.jobs(requests)
    run = explainer.run(jobs)
    predictions = list(itertools.islice(run, len(jobs)))
    run.close()
    assert [event.kind for event in predictions] == ["prediction"] * len(jobs)
    return jobs


def maps_of(count: int) -> torch.Tensor:
    """Item ``i``'s map is ``i + 1`` plus a ramp: no two items' maps alike."""
    ramp = np.linspace(0.0, 0.5, SIZE[1] * SIZE[2]).reshape(SIZE[1:])
    return torch.from_numpy(np.stack([i + 1 + ramp for i in range(count)]).astype(np.float32))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_item_gets_only_its_own_map_in_a_mixed_batch(explainer: Explainer) -> None:
    """Two streams and a unary call in one engine call: each stream gets the maps of its
    own items (one per target), the unary call none."""
    jobs = planned(
        explainer,
        [
            occlusion_request(target_classes=[0, 3]),
            occlusion_request(target_classes=[1]),
            occlusion_request(target_classes=[2]),
        ],
    )
    received: dict[int, list[Event]] = {0: [], 2: []}
    for index, inbox in received.items():
        jobs[index].refinements = Refinements(send=inbox.append)
    [group] = execute.groups(jobs)
    report = reporter(explainer.replies, group)
    assert report is not None
    maps = maps_of(len(group))
    report(Progress(maps=maps, forwards=len(group) * COARSE_FORWARDS))
    items = {(id(job), work.target): item for item, (job, work) in enumerate(group)}
    for index, inbox in received.items():
        assert {event.message.target for event in inbox} == set(jobs[index].query.targets)  # type: ignore[union-attr]
        for event in inbox:
            assert event.job is jobs[index] and event.kind is EventKind.REFINEMENT
            refinement = event.message
            assert isinstance(refinement, pb.Refinement)
            assert refinement.forwards == COARSE_FORWARDS
            item = items[(id(jobs[index]), refinement.target)]
            want = maps[item].numpy()
            np.testing.assert_allclose(decode_map(refinement.map), want, rtol=2.0**-10)
    assert "refine" not in jobs[1].timings  # nothing encoded for the unary call


def test_no_group_without_a_stream_builds_anytime_maps(explainer: Explainer) -> None:
    jobs = planned(explainer, [occlusion_request()])
    assert reporter(explainer.replies, execute.groups(jobs)[0]) is None


def test_at_most_one_refinement_per_explanation_per_interval(explainer: Explainer) -> None:
    [job] = planned(explainer, [occlusion_request(target_classes=[0, 1])])
    clock, inbox = Clock(), []
    job.refinements = Refinements(send=inbox.append, interval=0.2, clock=clock)
    [group] = execute.groups([job])
    report = reporter(explainer.replies, group)
    assert report is not None

    def report_at(now: float) -> int:
        clock.now = now
        before = len(inbox)
        report(Progress(maps=maps_of(2), forwards=64))
        return len(inbox) - before

    # Each report goes to both explanations, or to neither: the limit is per explanation.
    assert [report_at(t) for t in (100.0, 100.1, 100.19, 100.2, 100.3, 100.45)] == [
        2, 0, 0, 2, 0, 2,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(lambda job: setattr(job, "cancelled", lambda: True), id="cancelled"),
        pytest.param(lambda job: setattr(job, "deadline", 0.0), id="expired"),
        pytest.param(lambda job: setattr(job.refinements, "open", lambda: False), id="closed"),
    ],
)
def test_a_stopped_request_or_closed_stream_gets_none_and_costs_no_encoding(
    explainer: Explainer, stop: Callable[[Job], None]
) -> None:
    jobs = planned(explainer, [occlusion_request(), occlusion_request()])
    inboxes: list[list[Event]] = [[], []]
    for job, inbox in zip(jobs, inboxes, strict=True):
        job.refinements = Refinements(send=inbox.append)
    stop(jobs[0])
    [group] = execute.groups(jobs)
    report = reporter(explainer.replies, group)
    assert report is not None
    report(Progress(maps=maps_of(2), forwards=2 * COARSE_FORWARDS))
    assert inboxes[0] == [] and "refine" not in jobs[0].timings
    assert len(inboxes[1]) == 1  # its group mate still gets its own
