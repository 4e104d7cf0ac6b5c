"""The thin ExplainService servicer: admit, forward to TorchServe, turn reply errors into
exceptions. Explanations go to the model's explain pool, Predict and GetModelInfo to its
forward-only pool (:func:`~service.gateway.upstream.predict_pool`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

import grpc

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.admission import Admission
from service.gateway.metrics import GatewayMetrics
from service.gateway.upstream import TorchServeClient, predict_pool, raise_payload_error
from service.protocol.errors import InvalidInputError, clip
from service.protocol.names import METHODS

REQUEST_STAGES = ("decode", "forward", "mask", "score", "encode")


class ExplainServicer(pb_grpc.ExplainServiceServicer):
    """Routes each call to the named (or default) model on TorchServe."""

    def __init__(
        self,
        upstream: TorchServeClient,
        models: tuple[str, ...],
        metrics: GatewayMetrics,
        admission: Admission,
        *,
        split_pools: bool = True,
    ) -> None:
        self.upstream = upstream
        self.models = models
        self.metrics = metrics
        self.admission = admission
        self.split_pools = split_pools

    def model_label(self, request: object) -> str:
        """A metric label from a closed set: a served model name or "unknown"."""
        name = getattr(request, "model", None)
        if name is None:  # not a request message at all (undecodable bytes)
            return "unknown"
        name = name or self.models[0]
        return name if name in self.models else "unknown"

    def _forward_only(self, model: str) -> str:
        return predict_pool(model) if self.split_pools else model

    def _model(
        self,
        request: pb.ExplainRequest
        | pb.PredictRequest
        | pb.GetModelInfoRequest
        | pb.VisualizeClassRequest,
    ) -> str:
        name = request.model or self.models[0]
        if name not in self.models:
            raise InvalidInputError(
                f"unknown model {clip(request.model)}: this server serves {', '.join(self.models)}"
            )
        return name

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
        with self.admission.admit(model, "predict"):
            raw = await self.upstream.call(
                self._forward_only(model),
                "predict",
                request.SerializeToString(),
                context.time_remaining(),
                model=model,
            )
        response = pb.PredictResponse.FromString(raw)
        raise_payload_error(response.error)
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
        return info

    async def VisualizeClass(
        self, request: pb.VisualizeClassRequest, context: grpc.aio.ServicerContext
    ) -> pb.VisualizeClassResponse:
        model = self._model(request)
        with self.admission.admit(model, "explain"):
            raw = await self.upstream.call(
                model,
                "visualize",
                request.SerializeToString(),
                context.time_remaining(),
                model=model,
            )
        response = pb.VisualizeClassResponse.FromString(raw)
        raise_payload_error(response.error)
        return response

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
