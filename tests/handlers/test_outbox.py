"""The outbox on a clock of its own: what it writes around a deadline and a cancellation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handlers.outbox import GUARD_S, Outbox, Slot
from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.events import EventKind, stream_part
from tests.handlers.frontend import context


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def outbox(slots: list[Slot], clock: Clock) -> tuple[Outbox, list[dict[int, Any]]]:
    sent: list[dict[int, Any]] = []
    ctx = context(Path("."), ["unary"] * len(slots))
    box = Outbox(ctx, slots, lambda ret, *_: sent.append(ret), clock, clock.sleep)
    return box, sent


def explanation_part(target: int) -> pb.ExplainStreamResponse:
    return stream_part(EventKind.EXPLANATION, pb.Explanation(target=target))


def scores_part(index: int) -> pb.ExplainStreamResponse:
    return stream_part(EventKind.SCORES, pb.ScoreUpdate(explanation_index=index))


def test_parts_stop_short_of_the_deadline_and_the_summary_carries_the_rest() -> None:
    clock = Clock()
    box, sent = outbox([Slot(0, grpc=True, stream=True, deadline=clock.now + 1.0)], clock)
    box.part(0, explanation_part(0))
    box.part(0, scores_part(0))
    box.part(0, explanation_part(1))
    clock.now += 1.0 - GUARD_S / 2  # inside the window: nothing more is written
    box.part(0, scores_part(1))  # explanation 1's scores could not go
    box.part(0, explanation_part(2))
    clock.now -= 0.9  # even once the clock says there is time again: the stream froze
    box.part(0, explanation_part(3))
    assert len(sent) == 3
    response = pb.ExplainResponse(explanations=[pb.Explanation(target=t) for t in range(4)])
    summary = pb.ExplainStreamResponse.FromString(box.summary(0, response))
    assert [e.target for e in summary.summary.explanations] == [1, 2, 3]


def test_a_reply_due_in_the_window_waits_until_guard_after_the_deadline() -> None:
    clock = Clock()
    deadline = clock.now + 0.1
    slots = [Slot(0, True, False, unary=True, deadline=deadline), Slot(1, True, False)]
    box, sent = outbox(slots, clock)
    assert not box.early(0, b"reply")  # in the window: not now
    replies = box.final([b"a", b"b"])
    assert clock.waits == [deadline + GUARD_S - 100.0] and replies == [b"a", b"b"]
    assert sent == []
    headers = [box.context.get_response_headers(i) for i in (0, 1)]
    assert headers == [{"ts_stream_next": "false"}] * 2


def test_outside_the_window_nothing_waits() -> None:
    clock = Clock()
    slots = [
        Slot(0, True, False, unary=True, deadline=clock.now + 10),
        Slot(1, True, False, deadline=clock.now - 5),  # long expired: its call is closed
    ]
    box, sent = outbox(slots, clock)
    assert box.early(0, b"early")
    assert box.final([None, b"late"]) == [b"", b"late"]
    assert clock.waits == [] and sent == [{0: b"early"}]
    assert box.context.request_ids == {1: "request-1"}  # the final message skips request 0


def test_a_cancelled_request_gets_nothing_more() -> None:
    clock = Clock()
    cancelled = [False]
    slots = [Slot(0, True, True, cancelled=lambda: cancelled[0]), Slot(1, False, False)]
    box, sent = outbox(slots, clock)
    box.part(0, explanation_part(0))
    cancelled[0] = True
    box.part(0, explanation_part(1))
    box.final([b"summary", b"http"])
    assert len(sent) == 1
    assert box.context.request_ids == {1: "request-1"}
    assert box.context.get_response_headers(1) == {}  # HTTP: no stream header


def test_open_says_whether_a_part_can_go_without_freezing_the_stream() -> None:
    """A refinement's sender asks before it encodes a map: asking changes nothing, and a
    refinement never repeats in the summary."""
    clock = Clock()
    cancelled = False
    slots = [
        Slot(0, grpc=True, stream=True, deadline=clock.now + 1.0, cancelled=lambda: cancelled),
        Slot(1, grpc=True, stream=False, unary=True),
    ]
    box, sent = outbox(slots, clock)
    assert box.open(0) and not box.open(1)
    clock.now += 1.0 - GUARD_S / 2
    assert not box.open(0) and not slots[0].frozen  # asked only: the stream is not frozen
    clock.now -= 0.5
    refinement = stream_part(EventKind.REFINEMENT, pb.Refinement(target=2)).SerializeToString()
    box.progress(0, refinement)
    assert sent == [{0: refinement}]
    cancelled = True
    assert not box.open(0)
    response = pb.ExplainResponse(explanations=[pb.Explanation(target=2)])
    summary = pb.ExplainStreamResponse.FromString(box.summary(0, response))
    assert [e.target for e in summary.summary.explanations] == [2]
