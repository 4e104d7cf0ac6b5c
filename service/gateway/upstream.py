"""The gateway's client of TorchServe's own gRPC inference API (localhost only)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.torchserve import inference_pb2 as ts_pb
from service._proto.torchserve import inference_pb2_grpc as ts_grpc
from service.protocol.errors import error_from_code
from service.protocol.limits import MAX_MESSAGE_BYTES
from service.serving.cancel import CancelBoard

__all__ = ["MAX_MESSAGE_BYTES", "TorchServeClient", "UpstreamError", "raise_payload_error"]


class UpstreamError(Exception):
    """TorchServe itself failed the call (not one request of a batch)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class TorchServeClient:
    """Calls one TorchServe over gRPC, passing each call's deadline on."""

    def __init__(self, address: str, cancels: CancelBoard | None = None) -> None:
        self.address = address
        self.cancels = cancels or CancelBoard()
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = ts_grpc.InferenceAPIsServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def healthy(self, timeout: float = 2.0) -> bool:
        try:
            reply = await self.stub.Ping(empty_pb2.Empty(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return "Healthy" in reply.health

    async def call(self, model: str, key: str, payload: bytes, timeout: float | None) -> bytes:
        request = self._request(model, key, payload, timeout)
        try:
            reply = await self.stub.Predictions(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _upstream_error(exc, model) from None
        except asyncio.CancelledError:
            self.cancels.cancel(request.input["request_id"].decode())
            raise
        return reply.prediction

    async def stream(
        self, model: str, payload: bytes, timeout: float | None
    ) -> AsyncIterator[bytes]:
        request = self._request(model, "request", payload, timeout)
        request.input["stream"] = b"true"
        call = self.stub.StreamPredictions(request, timeout=timeout)
        complete = False
        try:
            async for reply in call:
                yield reply.prediction
            complete = True
        except grpc.aio.AioRpcError as exc:
            raise _upstream_error(exc, model) from None
        finally:
            if not complete:  # the client went away (or we failed): stop the worker's work
                self.cancels.cancel(request.input["request_id"].decode())
                call.cancel()

    @staticmethod
    def _request(
        model: str, key: str, payload: bytes, timeout: float | None
    ) -> ts_pb.PredictionsRequest:
        request = ts_pb.PredictionsRequest(model_name=model)
        request.input[key] = payload
        request.input["request_id"] = uuid.uuid4().hex.encode()
        # Unary unless stream() says otherwise: the handler may then send the reply as soon
        # as it is ready, not with its batch's slowest (handlers/outbox.py).
        request.input["stream"] = b"false"
        if timeout is not None:
            deadline_ms = int((time.time() + timeout) * 1000)
            request.input["deadline_unix_ms"] = str(deadline_ms).encode()
        return request


def _upstream_error(exc: grpc.aio.AioRpcError, model: str) -> UpstreamError:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND or "Model not found" in details:
        return UpstreamError(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served here")
    if code == grpc.StatusCode.UNAVAILABLE:
        return UpstreamError(code, f"model server unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamError(code, "deadline exceeded waiting for the model server")
    if code == grpc.StatusCode.CANCELLED:
        return UpstreamError(code, "call cancelled")
    return UpstreamError(code, f"model server error: {details}")


def raise_payload_error(error: pb.Error) -> None:
    """Turn an ``error`` field of a reply into the domain exception it stands for."""
    if error.code:
        raise error_from_code(error.code, error.message)
