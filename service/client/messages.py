"""Requests from Python arguments, and statuses back to the protocol's domain errors.

Both clients (blocking and asyncio) build their messages here, through the protocol's
domain types, so a name is checked against the wire enums before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.protocol.errors import EngineError, InvalidInputError, error_from_code
from service.protocol.families import DEFAULT_MASK, DEFAULT_METHOD, DEFAULT_VISUALIZATION
from service.protocol.limits import MAX_MESSAGE_BYTES
from service.protocol.names import VISUALIZATIONS
from service.protocol.params import format_value
from service.protocol.request import (
    DEFAULT_PREDICT_TOP_K,
    ExplainQuery,
    MaskCall,
    MethodCall,
    PredictQuery,
)

MethodArg = str | tuple[str, Mapping[str, object]]
"""A method name, or ``(name, {parameter: value})``."""
ImageArg = bytes | str | Path | np.ndarray
"""Encoded file bytes, a path to read them from, or uint8 ``(H, W, 3)`` RGB pixels."""
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def image_message(image: ImageArg) -> pb.Image:
    """The request's ``Image``: file bytes as they are, pixels as a uint8 tensor."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"pixels must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        tensor = pb.Tensor(shape=chw.shape, dtype=pb.Tensor.DTYPE_UINT8, data=chw.tobytes())
        return pb.Image(tensor=tensor)
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return pb.Image(encoded=data)


def explain_request(
    image: ImageArg,
    *,
    methods: Sequence[MethodArg] = (DEFAULT_METHOD,),
    top_k: int = 1,
    targets: Sequence[int] = (),
    mask: str = DEFAULT_MASK,
    mask_params: Mapping[str, object] | None = None,
    map_encoding: str = "png8",
    seed: int = 0,
    scores: Sequence[str] = (),
    model: str = "",
    concepts: int = 0,
) -> pb.ExplainRequest:
    """An ``ExplainRequest``; unknown method, mask, score or encoding names raise
    ``InvalidInputError`` listing the known ones, before anything is sent. ``concepts``:
    the most important CRAFT concepts per target (0: none)."""
    if concepts < 0:
        raise InvalidInputError(f"concepts must be >= 0, got {concepts}")
    calls = tuple(
        MethodCall(m) if isinstance(m, str) else MethodCall(m[0], dict(m[1])) for m in methods
    )
    request = ExplainQuery(
        image=image_message(image),
        model=model,
        top_k=top_k,
        targets=tuple(targets),
        methods=calls,
        mask=MaskCall(mask, dict(mask_params or {})),
        scores=tuple(scores),
        map_encoding=map_encoding,
        seed=seed,
    ).to_pb()
    request.concepts = concepts
    return request


def concepts_request(classes: Sequence[int] = (), *, model: str = "") -> pb.GetConceptsRequest:
    """A ``GetConceptsRequest`` for ``classes`` (empty: every class of the bank)."""
    if any(c < 0 for c in classes):
        raise InvalidInputError(f"classes must be indices >= 0, got {list(classes)}")
    return pb.GetConceptsRequest(model=model, classes=list(classes))


def predict_request(
    image: ImageArg, *, top_k: int = DEFAULT_PREDICT_TOP_K, model: str = ""
) -> pb.PredictRequest:
    return PredictQuery(image_message(image), model, top_k).to_pb()


def visualize_request(
    target: int,
    *,
    method: str = DEFAULT_VISUALIZATION,
    params: Mapping[str, object] | None = None,
    seed: int = 0,
    image_every: int = 0,
    model: str = "",
) -> pb.VisualizeClassRequest:
    """A ``VisualizeClassRequest``; an unknown method name raises ``InvalidInputError``
    listing the known ones, before anything is sent."""
    if target < 0:
        raise InvalidInputError(f"target must be a class index >= 0, got {target}")
    return pb.VisualizeClassRequest(
        model=model,
        target=target,
        method=VISUALIZATIONS.number(method),  # type: ignore[arg-type]
        params={name: format_value(value) for name, value in (params or {}).items()},  # type: ignore[arg-type]
        seed=seed,
        image_every=image_every,
    )


def domain_error(exc: grpc.RpcError) -> EngineError:
    """The domain error a failed call's status stands for (``InvalidInputError``...)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_from_code(code.name if code is not None else "UNKNOWN", details or "")


def tls_credentials(
    root_certificates: bytes | str | Path | None = None,
    client_cert: bytes | str | Path | None = None,
    client_key: bytes | str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM bytes or files.

    Args:
        root_certificates: the CA the gateway's certificate chains to; ``None``: the
            system's roots.
        client_cert, client_key: this client's certificate and key, for a gateway that
            requires mutual TLS.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("give both client_cert and client_key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates),
        private_key=_pem(client_key),
        certificate_chain=_pem(client_cert),
    )


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class ClientBase:
    """The channel, stub and call metadata both clients share.

    Args:
        address: ``host:port`` of the gateway.
        credentials: TLS channel credentials (:func:`tls_credentials`); ``None`` for a
            plaintext channel.
        token: a bearer token, sent as ``authorization: Bearer <token>`` on every call
            (for a gateway started with ``--auth-token-file``).
        server_name: the name to check the gateway's certificate against, when it differs
            from the host in ``address`` (an IP address, a tunnel).
    """

    transport: Any = grpc  # ``grpc`` or ``grpc.aio``: the same channel signatures

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ) -> None:
        options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is None:
            self.channel = self.transport.insecure_channel(address, options=options)
        else:
            self.channel = self.transport.secure_channel(address, credentials, options=options)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.stub = pb_grpc.ExplainServiceStub(self.channel)

    @staticmethod
    def request(image: ImageArg, **options: Any) -> pb.ExplainRequest:
        """The ``ExplainRequest`` a call with these options sends (:func:`explain_request`)."""
        return explain_request(image, **options)
