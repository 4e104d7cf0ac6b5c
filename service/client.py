"""Typed client of the saliency-serve gateway.

Example:
    >>> from service.client import SaliencyClient
    >>> with SaliencyClient("localhost:50051") as client:
    ...     reply = client.explain("cat.png", methods=["grad_cam", "smoothgrad"], top_k=1)
    ...     for item in reply.explanations:
    ...         saliency = decode_map(item.map)      # float32 (H, W)
    ...         mask = decode_mask(item.mask)        # bool (H, W)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import cv2
import grpc
import numpy as np

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.protocol.request import ExplainQuery, MaskCall, MethodCall
from service.serving.codec import decode_map, decode_mask

__all__ = ["MethodArg", "SaliencyClient", "decode_map", "decode_mask", "overlay"]

MethodArg = str | tuple[str, Mapping[str, object]]


class SaliencyClient:
    """Blocking client; one channel, reused. Every call takes a ``timeout`` in seconds."""

    def __init__(self, address: str = "localhost:50051", *, max_message_bytes: int = 64 << 20):
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self.stub = pb_grpc.ExplainServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SaliencyClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def request(
        image: bytes | str | Path,
        *,
        methods: Sequence[MethodArg] = ("vanilla_gradient",),
        top_k: int = 1,
        targets: Sequence[int] = (),
        mask: str = "threshold",
        map_encoding: str = "png8",
        seed: int = 0,
        scores: Sequence[str] = (),
        model: str = "",
    ) -> pb.ExplainRequest:
        """Build an ``ExplainRequest`` (image bytes, or a path to read them from)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        calls = tuple(
            MethodCall(m) if isinstance(m, str) else MethodCall(m[0], m[1]) for m in methods
        )
        return ExplainQuery(
            image=pb.Image(encoded=data),
            model=model,
            top_k=top_k,
            targets=tuple(targets),
            methods=calls,
            mask=MaskCall(mask),
            scores=tuple(scores),
            map_encoding=map_encoding,
            seed=seed,
        ).to_pb()

    def explain(
        self, image: bytes | str | Path, *, timeout: float | None = 60.0, **options: object
    ) -> pb.ExplainResponse:
        """Prediction and explanations in one response (see :meth:`request` for options)."""
        return self.stub.Explain(self.request(image, **options), timeout=timeout)  # type: ignore[arg-type]

    def explain_stream(
        self, image: bytes | str | Path, *, timeout: float | None = 60.0, **options: object
    ) -> Iterator[pb.ExplainStreamResponse]:
        """The prediction first, then each explanation and its scores as they complete."""
        return self.stub.ExplainStream(self.request(image, **options), timeout=timeout)  # type: ignore[arg-type]

    def predict(
        self,
        image: bytes | str | Path,
        *,
        top_k: int = 5,
        model: str = "",
        timeout: float | None = 10.0,
    ) -> pb.PredictResponse:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        request = pb.PredictRequest(model=model, image=pb.Image(encoded=data), top_k=top_k)
        return self.stub.Predict(request, timeout=timeout)

    def model_info(self, model: str = "", timeout: float | None = 10.0) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=timeout)


def overlay(image_rgb: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The map as a colour heat map over the image: uint8 ``(H, W, 3)`` RGB."""
    span = float(saliency.max() - saliency.min()) or 1.0
    scaled = (255 * (saliency - saliency.min()) / span).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return ((1 - alpha) * image_rgb + alpha * np.asarray(heat)).astype(np.uint8)
