"""The served models: names, the default, and each one's last ``GetModelInfo`` reply.

The names are fixed when the gateway starts (``serve`` registers every archive of its store;
a model is added by dropping its archive and restarting). The replies are cached from the
health probes, which ask every model's workers for ``model_info`` each interval anyway, and
from clients' ``GetModelInfo`` calls: ``ListModels`` answers from here without a call to
TorchServe, so listing never waits behind a busy pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.catalog import summary, unknown_model


class ModelCatalog:
    """What this gateway serves.

    Args:
        models: the served names (non-empty, no duplicates).
        default: the name an empty ``model`` field picks; ``None``: the first of ``models``.

    Raises:
        ValueError: no model, a duplicate, or a default that is not served.
    """

    def __init__(self, models: Sequence[str], default: str | None = None) -> None:
        if not models:
            raise ValueError("a gateway serves at least one model")
        if len(set(models)) != len(models):
            raise ValueError(f"model names are served once each: {list(models)}")
        self.models = tuple(models)
        self.default = default if default is not None else self.models[0]
        if self.default not in self.models:
            raise ValueError(
                f"default model {self.default!r} is not served (served: {', '.join(self.models)})"
            )
        self.infos: dict[str, pb.ModelInfo] = {}
        self._raw: dict[str, bytes] = {}

    def resolve(self, requested: str) -> str:
        """The served model a request's ``model`` field picks (empty: the default).

        Raises:
            ModelNotFoundError: not served (NOT_FOUND, bounded message listing the served).
        """
        name = requested or self.default
        if name not in self.models:
            raise unknown_model(requested, self.models)
        return name

    def label(self, requested: str) -> str:
        """A metric label from a closed set: the served name picked, or ``"unknown"``."""
        name = requested or self.default
        return name if name in self.models else "unknown"

    def record(self, model: str, raw: bytes) -> None:
        """Keep a worker's serialized ``ModelInfo`` reply for ``model`` (an error reply, or
        bytes that do not parse, leave the last good one in place)."""
        if model not in self.models or raw == self._raw.get(model):
            return  # the same reply as last time: nothing to parse
        try:
            info = pb.ModelInfo.FromString(raw)
        except Exception:  # a worker's reply is not ours to fail on; keep what we had
            return
        if info.error.code or not info.model.version:
            return
        self.infos[model] = info
        self._raw[model] = raw

    def listing(self, serving: Callable[[str], bool]) -> pb.ListModelsResponse:
        """``ListModels``: every served model in name order, ``serving`` from health."""
        return pb.ListModelsResponse(
            models=[
                summary(
                    name, self.infos.get(name), default=name == self.default, serving=serving(name)
                )
                for name in sorted(self.models)
            ]
        )
