"""The asyncio client: the same methods as :class:`~service.client.SaliencyClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
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


class AsyncSaliencyClient(ClientBase):
    """``grpc.aio`` client of ``saliency.v1.ExplainService``; use ``async with`` (arguments:
    :class:`ClientBase`)."""

    transport = grpc.aio

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncSaliencyClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def explain(
        self, image: ImageArg, *, timeout: float | None = 60.0, **options: Any
    ) -> pb.ExplainResponse:
        """Prediction and explanations in one response (options: :func:`explain_request`)."""
        return await self.stub.Explain(
            explain_request(image, **options), timeout=timeout, metadata=self.metadata
        )

    def explain_stream(
        self, image: ImageArg, *, timeout: float | None = 60.0, **options: Any
    ) -> AsyncIterator[pb.ExplainStreamResponse]:
        """The prediction first, then each explanation and its scores as they complete; a
        slow method's ``refinement`` parts (maps so far) before its explanation (keep the
        newest per explanation with :class:`~service.client.anytime.LatestMaps`).

        Leaving the loop early cancels the call, which stops the work it started.
        """
        request = explain_request(image, **options)
        return _cancelling(
            lambda: self.stub.ExplainStream(request, timeout=timeout, metadata=self.metadata)
        )

    async def predict(
        self,
        image: ImageArg,
        *,
        top_k: int = DEFAULT_PREDICT_TOP_K,
        model: str = "",
        timeout: float | None = 10.0,
    ) -> pb.PredictResponse:
        """Forward only: the ``top_k`` most probable classes."""
        request = predict_request(image, top_k=top_k, model=model)
        return await self.stub.Predict(request, timeout=timeout, metadata=self.metadata)

    async def model_info(self, model: str = "", timeout: float | None = 10.0) -> pb.ModelInfo:
        """Labels, input size, and every method, mask and score with its parameters."""
        request = pb.GetModelInfoRequest(model=model)
        return await self.stub.GetModelInfo(request, timeout=timeout, metadata=self.metadata)

    async def list_models(self, timeout: float | None = 10.0) -> pb.ListModelsResponse:
        """Every served model (name, version, default flag, input size, methods)."""
        request = pb.ListModelsRequest()
        return await self.stub.ListModels(request, timeout=timeout, metadata=self.metadata)

    async def concepts(
        self, classes: Sequence[int] = (), *, model: str = "", timeout: float | None = 10.0
    ) -> pb.GetConceptsResponse:
        """The model's CRAFT concepts per class, with their most typical crops (PNG)."""
        request = concepts_request(classes, model=model)
        return await self.stub.GetConcepts(request, timeout=timeout, metadata=self.metadata)

    async def visualize_class(
        self, target: int, *, timeout: float | None = 60.0, **options: Any
    ) -> pb.VisualizeClassResponse:
        """The image that maximises class ``target``'s score (options:
        :func:`~service.client.messages.visualize_request`)."""
        request = visualize_request(target, **options)
        return await self.stub.VisualizeClass(request, timeout=timeout, metadata=self.metadata)

    def visualize_class_stream(
        self, target: int, *, timeout: float | None = 60.0, **options: Any
    ) -> AsyncIterator[pb.VisualizeClassStreamResponse]:
        """Progress as the search goes, the result last; leaving the loop early cancels
        the call, which stops the search."""
        request = visualize_request(target, **options)
        return _cancelling(
            lambda: self.stub.VisualizeClassStream(request, timeout=timeout, metadata=self.metadata)
        )


async def _cancelling(start: Callable[[], Any]) -> AsyncIterator[Any]:
    """The messages of the streaming call ``start`` makes once iterated; the call is
    cancelled when the reader stops early."""
    call = start()
    try:
        async for part in call:
            yield part
    finally:
        call.cancel()
