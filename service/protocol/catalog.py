"""The served models as ``ListModels`` reports them, and the words every host uses for them.

Shared by the gateway (which answers ``ListModels`` and refuses unknown names), ``serve``
(which prints what it serves) and the client's ``models`` command. Protobuf and stdlib only.
"""

from __future__ import annotations

from collections.abc import Sequence

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import ModelNotFoundError, clip
from service.protocol.names import METHODS

LISTED_NAMES = 20
"""Most served names an error message lists (a store may hold hundreds)."""


def summary(
    name: str, info: pb.ModelInfo | None, *, default: bool, serving: bool
) -> pb.ModelSummary:
    """What ``ListModels`` says of served model ``name``, from its ``GetModelInfo`` reply
    (``None``: not known yet, so only the name and flags are set)."""
    entry = pb.ModelSummary(name=name, default=default, serving=serving)
    if info is None:
        return entry
    entry.version = info.model.version
    entry.channels, entry.height, entry.width = info.channels, info.height, info.width
    entry.labels_count = len(info.labels)
    entry.target_layer = info.target_layer
    entry.methods.extend(m.method for m in info.methods if m.available)
    return entry


def describe(entry: pb.ModelSummary) -> str:
    """One line per model: ``serve`` prints it at start, ``saliency-serve models`` lists it."""
    flags = " (default)" if entry.default else ""
    if not entry.version:
        return f"{entry.name}{flags}: not answered yet"
    layer = entry.target_layer or "none"
    return (
        f"{entry.name}{flags}: version {entry.version}, input {entry.channels}x{entry.height}x"
        f"{entry.width}, {entry.labels_count} labels, CAM layer {layer}, "
        f"{len(entry.methods)} of {len(METHODS.names())} methods"
    )


def served_names(names: Sequence[str], limit: int = LISTED_NAMES) -> str:
    """``names`` for a message: at most ``limit`` of them, then how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def unknown_model(requested: str, names: Sequence[str]) -> ModelNotFoundError:
    """NOT_FOUND for a name this server does not serve: the name echoed (clipped) and the
    served ones listed (bounded), so the message stays short whatever was sent."""
    return ModelNotFoundError(
        f"unknown model {clip(requested)}: this server serves {served_names(names)} "
        "(ListModels lists them; an empty name picks the default)"
    )
