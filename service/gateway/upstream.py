"""The gateway's client of TorchServe's own gRPC inference API (localhost only).

Each served model is registered twice in TorchServe (``service.launcher``): ``<name>`` runs
explanations and ``<name>--predict`` (:func:`predict_pool`) has its own workers, batch and
queue for the forward-only calls, so a Predict never waits behind an explanation.

A failed TorchServe call becomes the domain error of :mod:`service.protocol.upstream`'s
table. A call that failed because its worker died, or because the model server was
briefly unreachable, is sent once more (:class:`RetryPolicy`): TorchServe restarts dead
workers by itself, and the other workers keep serving meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.torchserve import inference_pb2 as ts_pb
from service._proto.torchserve import inference_pb2_grpc as ts_grpc
from service.protocol.errors import UnavailableError, error_from_code
from service.protocol.limits import MAX_MESSAGE_BYTES
from service.protocol.upstream import from_torchserve
from service.serving.cancel import CancelBoard

__all__ = ["MAX_MESSAGE_BYTES", "KeyFile", "RetryPolicy", "TorchServeClient", "predict_pool"]
logger = logging.getLogger(__name__)
PREDICT_SUFFIX = "--predict"


def predict_pool(model: str) -> str:
    """TorchServe's name for the forward-only twin of ``model``."""
    return model + PREDICT_SUFFIX


class KeyFile:
    """TorchServe's inference key, read from its ``key_file.json`` again whenever it changes.

    TorchServe writes a new key file each time it starts, so a gateway in front of a
    restarted TorchServe picks the new key up on its next call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._key = ""

    def key(self) -> str:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return self._key  # between a restart's removal and rewrite: the last one
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                self._key = json.loads(self.path.read_text())["inference"]["key"]
                self._stamp = stamp
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning("cannot read TorchServe's key file %s yet", self.path)
        return self._key


@dataclass(frozen=True)
class RetryPolicy:
    """One more try for a call whose worker died or whose server was briefly unreachable.

    Attributes:
        attempts: tries in all (1: no retry).
        delay_s: (low, high) of the uniformly jittered pause before a retry: enough for
            TorchServe to requeue, short against any deadline; jittered so that the calls
            a dead worker failed together do not come back together.
        min_left_s: no retry when less than this is left of the call's deadline.
    """

    attempts: int = 2
    delay_s: tuple[float, float] = (0.05, 0.15)
    min_left_s: float = 0.25

    def pause(self, time_left: float | None) -> float | None:
        """Seconds to wait before the retry, or ``None`` when there is no time for one."""
        pause = random.uniform(*self.delay_s)
        if time_left is not None and time_left - pause < self.min_left_s:
            return None
        return pause


class TorchServeClient:
    """Calls one TorchServe over gRPC, passing each call's deadline on.

    Args:
        address: TorchServe's gRPC inference ``host:port``.
        key: TorchServe's inference key (``None``: token authorization is off there).
        retry: what to do when a worker dies under a call.
        on_answer: called with TorchServe's model name whenever a worker answered, so that
            health knows the model can answer without probing it.
        on_retry: called with the served model's name when a call is sent once more.
        backstop_s: the longest a call without a client deadline may take (the worker
            applies its own default deadline to those; this only frees the gateway's slot
            if the model server never answers).
    """

    def __init__(
        self,
        address: str,
        *,
        key: KeyFile | None = None,
        retry: RetryPolicy | None = None,
        cancels: CancelBoard | None = None,
        on_answer: Callable[[str], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
        backstop_s: float = 900.0,
    ) -> None:
        self.address = address
        self.key = key
        self.retry = retry or RetryPolicy()
        self.cancels = cancels or CancelBoard()
        self.on_answer = on_answer or (lambda _name: None)
        self.on_retry = on_retry or (lambda _name: None)
        self.retries = 0
        self.backstop_s = backstop_s
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

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        key = self.key.key() if self.key is not None else ""
        return (("authorization", f"Bearer {key}"),) if key else ()

    async def ping(self, timeout: float) -> bool | None:
        """Whether TorchServe's frontend (the Java process) is there: ``True`` when it
        answered, ``False`` when it cannot be reached (a dead process refuses the
        connection at once), ``None`` when it did not answer in time (busy, not gone)."""
        try:
            await self.stub.Ping(empty_pb2.Empty(), timeout=timeout, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            return False if exc.code() == grpc.StatusCode.UNAVAILABLE else None
        return True

    async def call(
        self,
        ts_model: str,
        key: str,
        payload: bytes,
        timeout: float | None,
        *,
        model: str,
        retry: bool = True,
    ) -> bytes:
        """One unary ``Predictions`` call, retried once when its worker died.

        Args:
            ts_model: TorchServe's model name (``model`` or its :func:`predict_pool`).
            key: the handler's input key (``request``, ``predict``, ``model_info``).
            timeout: seconds left of the client's deadline; ``None``: none was set.
            model: the served model's name, for messages.
            retry: whether a call whose worker died is sent again.
        """
        end = time.monotonic() + (self.backstop_s if timeout is None else timeout)
        deadline = _deadline_ms(timeout)
        for attempt in range(1, self.retry.attempts + 1):
            request = self._request(ts_model, key, payload, deadline)
            try:
                reply = await self.stub.Predictions(
                    request, timeout=_left(end), metadata=self._metadata()
                )
            except grpc.aio.AioRpcError as exc:
                error = from_torchserve(exc.code().name, exc.details() or "", model)
                pause = self._retry_pause(error, attempt, end, model) if retry else None
                if pause is None:
                    raise error from None
                await asyncio.sleep(pause)
                continue
            except asyncio.CancelledError:
                self.cancels.cancel(request.input["request_id"].decode())
                raise
            self.on_answer(ts_model)
            return reply.prediction
        raise AssertionError("unreachable: the last attempt raises or returns")

    async def stream(
        self,
        ts_model: str,
        payload: bytes,
        timeout: float | None,
        *,
        model: str,
        key: str = "request",
    ) -> AsyncIterator[bytes]:
        """``StreamPredictions`` with the handler input ``key`` (``request``, ``visualize``):
        retried once only when it failed before its first part."""
        end = time.monotonic() + (self.backstop_s if timeout is None else timeout)
        deadline = _deadline_ms(timeout)
        for attempt in range(1, self.retry.attempts + 1):
            request = self._request(ts_model, key, payload, deadline)
            request.input["stream"] = b"true"
            call = self.stub.StreamPredictions(
                request, timeout=_left(end), metadata=self._metadata()
            )
            sent = False
            complete = False
            try:
                async for reply in call:
                    sent = True
                    yield reply.prediction
                complete = True
            except grpc.aio.AioRpcError as exc:
                error = from_torchserve(exc.code().name, exc.details() or "", model)
                pause = None if sent else self._retry_pause(error, attempt, end, model)
                if pause is None:
                    raise error from None
                await asyncio.sleep(pause)
                continue
            finally:
                if not complete:  # the client went away (or we failed): stop the worker's work
                    self.cancels.cancel(request.input["request_id"].decode())
                    call.cancel()
            self.on_answer(ts_model)
            return

    def _retry_pause(self, error: Exception, attempt: int, end: float, model: str) -> float | None:
        if not isinstance(error, UnavailableError) or attempt >= self.retry.attempts:
            return None
        pause = self.retry.pause(_left(end))
        if pause is not None:
            self.retries += 1
            self.on_retry(model)
            logger.info("retrying a call after: %s", error)
        return pause

    @staticmethod
    def _request(
        model: str, key: str, payload: bytes, deadline_ms: int | None
    ) -> ts_pb.PredictionsRequest:
        request = ts_pb.PredictionsRequest(model_name=model)
        request.input[key] = payload
        request.input["request_id"] = uuid.uuid4().hex.encode()  # one per attempt
        # Unary unless stream() says otherwise: the handler may then send the reply as soon
        # as it is ready, not with its batch's slowest (handlers/outbox.py).
        request.input["stream"] = b"false"
        if deadline_ms is not None:  # the client's deadline, the same for every attempt
            request.input["deadline_unix_ms"] = str(deadline_ms).encode()
        return request


def _deadline_ms(timeout: float | None) -> int | None:
    """The client's deadline as wall-clock milliseconds, which the worker reads."""
    return None if timeout is None else int((time.time() + timeout) * 1000)


def _left(end: float) -> float:
    return max(end - time.monotonic(), 0.0)


def raise_payload_error(error: pb.Error) -> None:
    """Turn an ``error`` field of a reply into the domain exception it stands for."""
    if error.code:
        raise error_from_code(error.code, error.message)
