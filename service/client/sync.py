"""The blocking client: one channel, reused; every call takes a ``timeout`` in seconds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.messages import (
    ClientBase,
    ImageArg,
    concepts_request,
    explain_request,
    predict_request,
    visualize_request,
)
from service.protocol.request import DEFAULT_PREDICT_TOP_K


class SaliencyClient(ClientBase):
    """Blocking client of ``saliency.v1.ExplainService`` (arguments: :class:`ClientBase`)."""

    transport = grpc

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SaliencyClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def explain(
        self, image: ImageArg, *, timeout: float | None = 60.0, **options: Any
    ) -> pb.ExplainResponse:
        """Prediction and explanations in one response (options: :func:`explain_request`)."""
        return self.stub.Explain(
            explain_request(image, **options), timeout=timeout, metadata=self.metadata
        )

    def explain_stream(
        self, image: ImageArg, *, timeout: float | None = 60.0, **options: Any
    ) -> Iterator[pb.ExplainStreamResponse]:
        """The prediction first, then each explanation and its scores as they complete; a
        slow method's ``refinement`` parts (maps so far) before its explanation (keep the
        newest per explanation with :class:`~service.client.anytime.LatestMaps`)."""
        return self.stub.ExplainStream(
            explain_request(image, **options), timeout=timeout, metadata=self.metadata
        )

    def predict(
        self,
        image: ImageArg,
        *,
        top_k: int = DEFAULT_PREDICT_TOP_K,
        model: str = "",
        timeout: float | None = 10.0,
    ) -> pb.PredictResponse:
        """Forward only: the ``top_k`` most probable classes."""
        return self.stub.Predict(
            predict_request(image, top_k=top_k, model=model),
            timeout=timeout,
            metadata=self.metadata,
        )

    def model_info(self, model: str = "", timeout: float | None = 10.0) -> pb.ModelInfo:
        """Labels, input size, and every method, mask and score with its parameters."""
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(model=model), timeout=timeout, metadata=self.metadata
        )

    def list_models(self, timeout: float | None = 10.0) -> pb.ListModelsResponse:
        """Every served model (name, version, default flag, input size, methods)."""
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self.metadata)

    def concepts(
        self, classes: Sequence[int] = (), *, model: str = "", timeout: float | None = 10.0
    ) -> pb.GetConceptsResponse:
        """The model's CRAFT concepts per class, with their most typical crops (PNG)."""
        request = concepts_request(classes, model=model)
        return self.stub.GetConcepts(request, timeout=timeout, metadata=self.metadata)

    def visualize_class(
        self, target: int, *, timeout: float | None = 60.0, **options: Any
    ) -> pb.VisualizeClassResponse:
        """The image that maximises class ``target``'s score (options:
        :func:`~service.client.messages.visualize_request`)."""
        return self.stub.VisualizeClass(
            visualize_request(target, **options), timeout=timeout, metadata=self.metadata
        )

    def visualize_class_stream(
        self, target: int, *, timeout: float | None = 60.0, **options: Any
    ) -> Iterator[pb.VisualizeClassStreamResponse]:
        """Progress as the search goes (the image every ``image_every`` steps), the result
        last."""
        return self.stub.VisualizeClassStream(
            visualize_request(target, **options), timeout=timeout, metadata=self.metadata
        )
