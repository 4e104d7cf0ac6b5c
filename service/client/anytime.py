"""Anytime maps: the latest map of every explanation of an ``ExplainStream``.

A stream may send a slow method's maps so far (``refinement`` parts) before its
``explanation``; each later one supersedes the earlier, and the explanation supersedes
them all. :class:`LatestMaps` keeps, per explanation, the newest of them, so that a client
shows a coarse map at once and swaps it as better ones arrive.

Example:
    >>> maps = LatestMaps()
    >>> for part in client.explain_stream("cat.png", methods=["occlusion"]):
    ...     if (key := maps.update(part)) is not None:
    ...         show(key, decode_map(maps[key].map), final=maps.final(key))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from service._proto.saliency.v1 import saliency_pb2 as pb

MapKey = tuple[int, int, tuple[tuple[str, str], ...]]
"""``(method, target, sorted params)``: what a refinement shares with its explanation."""


def map_key(message: pb.Refinement | pb.Explanation) -> MapKey:
    """The explanation a refinement will become, or an explanation's own key."""
    return (int(message.method), int(message.target), tuple(sorted(message.params.items())))


@dataclass
class LatestMaps(Mapping[MapKey, "pb.Refinement | pb.Explanation"]):
    """The newest ``refinement`` or ``explanation`` of every key seen so far, in order."""

    _latest: dict[MapKey, pb.Refinement | pb.Explanation] = field(default_factory=dict)
    _final: set[MapKey] = field(default_factory=set)

    def update(self, part: pb.ExplainStreamResponse) -> MapKey | None:
        """Take one stream part; returns the key whose map it changed, if any.

        A refinement that arrives after its explanation (never, from this server) is
        ignored rather than allowed to replace the final map.
        """
        kind = part.WhichOneof("part")
        if kind not in ("refinement", "explanation"):
            return None
        message = getattr(part, kind)
        key = map_key(message)
        if key in self._final:
            return None
        self._latest[key] = message
        if kind == "explanation":
            self._final.add(key)
        return key

    def final(self, key: MapKey) -> bool:
        """Whether the map of ``key`` is its explanation's (no refinement will follow)."""
        return key in self._final

    def __getitem__(self, key: MapKey) -> pb.Refinement | pb.Explanation:
        return self._latest[key]

    def __iter__(self) -> Iterator[MapKey]:
        return iter(self._latest)

    def __len__(self) -> int:
        return len(self._latest)


def collect_stream(
    parts: Iterable[pb.ExplainStreamResponse],
    on_refinement: Callable[[pb.Refinement], None] | None = None,
) -> pb.ExplainResponse:
    """The response a stream's parts add up to: what ``Explain`` returns for the request.

    Args:
        parts: an ``explain_stream`` call, read to its end.
        on_refinement: called with each refinement as it arrives (a progress line, a
            redrawn map); refinements are not part of the response.

    Returns:
        Predictions, every explanation (those the parts showed, with their scores, then
        those only the summary carries) and the summary's timings.
    """
    response = pb.ExplainResponse()
    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "prediction":
            response.model.CopyFrom(part.prediction.model)
            response.predictions.extend(part.prediction.predictions)
        elif kind == "refinement" and on_refinement is not None:
            on_refinement(part.refinement)
        elif kind == "explanation":
            response.explanations.append(part.explanation)
        elif kind == "scores":
            shown = response.explanations[part.scores.explanation_index]
            shown.scores.extend(part.scores.scores)
        elif kind == "summary":
            response.explanations.extend(part.summary.explanations)
            response.timings.extend(part.summary.timings)
            response.concepts.extend(part.summary.concepts)
            response.error.CopyFrom(part.summary.error)
    return response
