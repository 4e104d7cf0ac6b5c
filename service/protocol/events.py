"""The kinds of news a request gets, in the order ``ExplainStream`` sends them.

The pipeline yields them, the handler forwards them as ``ExplainStreamResponse`` parts,
and a client reads them back with :func:`event_kind`: one enum for all three.
"""

from __future__ import annotations

from enum import StrEnum

from google.protobuf.message import Message

from service._proto.saliency.v1 import saliency_pb2 as pb


class EventKind(StrEnum):
    """``prediction`` (forward only), then per map ``explanation`` and ``scores``, then
    ``done`` (the complete response, sent as the stream's ``summary``). A slow method's
    map may be preceded by ``refinement`` events (its anytime maps, streams only)."""

    PREDICTION = "prediction"
    REFINEMENT = "refinement"
    EXPLANATION = "explanation"
    SCORES = "scores"
    DONE = "done"

    @property
    def part(self) -> str:
        """The ``ExplainStreamResponse.part`` field that carries this kind."""
        return "summary" if self is EventKind.DONE else self.value


def stream_part(kind: EventKind, message: Message) -> pb.ExplainStreamResponse:
    """The stream message carrying ``message`` as ``kind``."""
    part = pb.ExplainStreamResponse()
    getattr(part, kind.part).CopyFrom(message)
    return part


def event_kind(part: pb.ExplainStreamResponse) -> EventKind:
    """The kind of a received stream message."""
    field = part.WhichOneof("part")
    if field is None:
        raise ValueError("an empty ExplainStreamResponse")
    return EventKind.DONE if field == "summary" else EventKind(field)
