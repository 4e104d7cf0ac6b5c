"""LatestMaps: the newest map per explanation, the explanation's once it came."""

from __future__ import annotations

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client import LatestMaps, collect_stream, map_key
from service.protocol.events import EventKind, stream_part
from service.protocol.names import METHODS

OCCLUSION = METHODS.number("occlusion")
RISE = METHODS.number("rise")


def refinement(method: int, target: int, forwards: int, **params: str) -> pb.ExplainStreamResponse:
    message = pb.Refinement(method=method, target=target, forwards=forwards, params=params)  # type: ignore[arg-type]
    return stream_part(EventKind.REFINEMENT, message)


def explanation(method: int, target: int, **params: str) -> pb.ExplainStreamResponse:
    message = pb.Explanation(method=method, target=target, params=params)  # type: ignore[arg-type]
    return stream_part(EventKind.EXPLANATION, message)


def test_the_newest_map_of_each_key_wins_and_the_explanation_is_final() -> None:
    maps = LatestMaps()
    parts = [
        stream_part(EventKind.PREDICTION, pb.PredictResponse()),
        refinement(RISE, 1, 32, n_masks="256"),
        refinement(RISE, 2, 32, n_masks="256"),  # another target: another key
        refinement(RISE, 1, 64, n_masks="256"),
        refinement(OCCLUSION, 1, 17),
        explanation(RISE, 1, n_masks="256"),
        stream_part(EventKind.SCORES, pb.ScoreUpdate()),
        refinement(RISE, 1, 128, n_masks="256"),  # after its explanation: ignored
    ]
    changed = [maps.update(part) for part in parts]
    rise_1 = (RISE, 1, (("n_masks", "256"),))
    assert changed == [
        None,
        rise_1,
        (RISE, 2, (("n_masks", "256"),)),
        rise_1,
        (OCCLUSION, 1, ()),
        rise_1,
        None,
        None,
    ]
    assert len(maps) == 3 and list(maps) == [rise_1, changed[2], changed[4]]
    assert isinstance(maps[rise_1], pb.Explanation) and maps.final(rise_1)
    assert maps[changed[2]].forwards == 32 and not maps.final(changed[2])  # type: ignore[union-attr]


def test_a_refinement_and_its_explanation_share_a_key_whatever_the_params_order() -> None:
    first = pb.Refinement(method=RISE, target=3, params={"a": "1", "b": "2"})  # type: ignore[arg-type]
    second = pb.Explanation(method=RISE, target=3, params={"b": "2", "a": "1"})  # type: ignore[arg-type]
    assert map_key(first) == map_key(second)
    assert map_key(first) != map_key(pb.Explanation(method=RISE, target=3, params={"a": "2"}))  # type: ignore[arg-type]


def test_collect_stream_adds_the_parts_up_to_the_unary_response() -> None:
    """Shown explanations get their scores by index; those only the summary carries (a
    frozen stream) follow; refinements go to the callback only."""
    seen: list[int] = []
    score = pb.ScoreValue(score=1, value=0.25)  # type: ignore[arg-type]
    parts = [
        stream_part(EventKind.PREDICTION, pb.PredictResponse(predictions=[pb.Prediction(index=4)])),
        refinement(RISE, 4, 32),
        explanation(RISE, 4),
        stream_part(EventKind.SCORES, pb.ScoreUpdate(explanation_index=0, scores=[score])),
        stream_part(
            EventKind.DONE,
            pb.ExplainResponse(
                explanations=[pb.Explanation(method=OCCLUSION, target=4)],  # type: ignore[arg-type]
                timings=[pb.StageTiming(stage="total", seconds=1.0)],
            ),
        ),
    ]
    response = collect_stream(parts, on_refinement=lambda r: seen.append(r.forwards))
    assert seen == [32]
    assert [p.index for p in response.predictions] == [4]
    assert [(e.method, e.target) for e in response.explanations] == [(RISE, 4), (OCCLUSION, 4)]
    assert list(response.explanations[0].scores) == [score]
    assert not response.explanations[1].scores
    assert [t.stage for t in response.timings] == ["total"] and not response.error.code


def test_collect_stream_keeps_the_summarys_concepts() -> None:
    found = pb.TargetConcepts(target=4, concepts=[pb.ConceptAttribution(concept=2, importance=0.5)])
    parts = [stream_part(EventKind.DONE, pb.ExplainResponse(concepts=[found]))]
    assert list(collect_stream(parts).concepts) == [found]
