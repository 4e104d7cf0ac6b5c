"""The thin ExplainService servicer: admit, forward to TorchServe, turn reply errors into
exceptions. Explanations go to the model's explain pool, Predict and GetModelInfo to its
forward-only pool (:func:`~service.gateway.upstream.predict_pool`); ListModels answers from
the :class:`~service.gateway.catalog.ModelCatalog`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.admission import Admission
from service.gateway.catalog import ModelCatalog
from service.gateway.metrics import GatewayMetrics
from service.gateway.upstream import TorchServeClient, predict_pool, raise_payload_error
from service.protocol.names import METHODS

# The unary replies that carry an ``error`` field (a TypeVar with constraints, so each
# one's ``error`` and ``FromString`` are checked).
Reply = TypeVar("Reply", pb.PredictResponse, pb.VisualizeClassResponse, pb.GetConceptsResponse)
REQUEST_STAGES = ("decode", "forward", "mask", "score", "encode")


class ExplainServicer(pb_grpc.ExplainServiceServicer):
    """Routes each call to the named (or default) model on TorchServe.

    Args:
        serving: whether a served model's pools answer now (health), for ListModels.
    """

    def __init__(
        self,
        upstream: TorchServeClient,
        catalog: ModelCatalog,
        metrics: GatewayMetrics,
        admission: Admission,
        serving: Callable[[str], bool],
        *,
        split_pools: bool = True,
    ) -> None:
        self.upstream = upstream
        self.catalog = catalog
        self.metrics = metrics
        self.admission = admission
        self.serving = serving
        self.split_pools = split_pools

    def model_label(self, request: object) -> str:
        """A metric label from a closed set: a served model name, ``"all"`` for ListModels,
        or ``"unknown"``."""
        if isinstance(request, pb.ListModelsRequest):
            return "all"
        name = getattr(request, "model", None)
        if name is None:  # not a request message at all (undecodable bytes)
            return "unknown"
        return self.catalog.label(name)

    def _forward_only(self, model: str) -> str:
        return predict_pool(model) if self.split_pools else model

    def _model(
        self,
        request: pb.ExplainRequest
        | pb.PredictRequest
        | pb.GetModelInfoRequest
        | pb.VisualizeClassRequest
        | pb.GetConceptsRequest,
    ) -> str:
        return self.catalog.resolve(request.model)

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        model = self._model(request)
        start = time.perf_counter()
        with self.admission.admit(model, "explain"):
            raw = await self.upstream.call(
                model, "request", request.SerializeToString(), context.time_remaining(), model=model
            )
        response = pb.ExplainResponse.FromString(raw)
        raise_payload_error(response.error)
        self._observe(model, response.timings, response.explanations, time.perf_counter() - start)
        return response

    async def ExplainStream(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExplainStreamResponse]:
        model = self._model(request)
        start = time.perf_counter()
        explanations: list[pb.Explanation] = []
        with self.admission.admit(model, "explain"):
            async for raw in self.upstream.stream(
                model, request.SerializeToString(), context.time_remaining(), model=model
            ):
                part = pb.ExplainStreamResponse.FromString(raw)
                if part.WhichOneof("part") == "summary":
                    raise_payload_error(part.summary.error)
                    self._observe(
                        model, part.summary.timings, explanations, time.perf_counter() - start
                    )
                elif part.WhichOneof("part") == "explanation":
                    explanations.append(part.explanation)
                yield part

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        model = self._model(request)
        start = time.perf_counter()
        response = await self._unary(
            model, "predict", "predict", request, pb.PredictResponse, context
        )
        self._observe(model, response.timings, [], time.perf_counter() - start)
        return response

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        model = self._model(request)
        with self.admission.admit(model, "predict"):
            raw = await self.upstream.call(
                self._forward_only(model), "model_info", b"", context.time_remaining(), model=model
            )
        info = pb.ModelInfo.FromString(raw)
        raise_payload_error(info.error)
        self.catalog.record(model, raw)
        return info

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return self.catalog.listing(self.serving)

    async def VisualizeClass(
        self, request: pb.VisualizeClassRequest, context: grpc.aio.ServicerContext
    ) -> pb.VisualizeClassResponse:
        return await self._unary(
            self._model(request),
            "explain",
            "visualize",
            request,
            pb.VisualizeClassResponse,
            context,
        )

    async def VisualizeClassStream(
        self, request: pb.VisualizeClassRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.VisualizeClassStreamResponse]:
        model = self._model(request)
        with self.admission.admit(model, "explain"):
            async for raw in self.upstream.stream(
                model,
                request.SerializeToString(),
                context.time_remaining(),
                model=model,
                key="visualize",
            ):
                part = pb.VisualizeClassStreamResponse.FromString(raw)
                if part.WhichOneof("part") == "result":
                    raise_payload_error(part.result.error)
                yield part

    async def GetConcepts(
        self, request: pb.GetConceptsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConceptsResponse:
        # Stored bytes, no model work: the forward-only pool, admitted as a Predict.
        return await self._unary(
            self._model(request), "predict", "concepts", request, pb.GetConceptsResponse, context
        )

    async def _unary(
        self,
        model: str,
        pool: str,
        key: str,
        request: Message,
        reply: type[Reply],
        context: grpc.aio.ServicerContext,
    ) -> Reply:
        """One admitted upstream call: ``pool`` is ``"explain"`` (the model's own workers)
        or ``"predict"`` (its forward-only twin); a payload error becomes its status."""
        target = model if pool == "explain" else self._forward_only(model)
        with self.admission.admit(model, pool):
            raw = await self.upstream.call(
                target, key, request.SerializeToString(), context.time_remaining(), model=model
            )
        response = reply.FromString(raw)
        raise_payload_error(response.error)
        return response

    def _observe(
        self,
        model: str,
        timings: Iterable[pb.StageTiming],
        explanations: Iterable[pb.Explanation],
        upstream_seconds: float,
    ) -> None:
        stage = self.metrics.stage_duration
        handler_total = 0.0
        for timing in timings:
            if timing.stage in REQUEST_STAGES:
                stage.labels(timing.stage, "all", model).observe(timing.seconds)
            if timing.stage == "total":
                handler_total = timing.seconds
        for explanation in explanations:
            stage.labels("explain", METHODS.label(explanation.method), model).observe(
                explanation.seconds
            )
        # Time outside the handler: transport, TorchServe queueing and batching delay.
        stage.labels("upstream", "all", model).observe(max(upstream_seconds - handler_total, 0.0))
