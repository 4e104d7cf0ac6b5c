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

from collections.abc import Iterator, Mapping
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
