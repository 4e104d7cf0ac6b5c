"""Typed client of the saliency-serve gateway: installs with grpcio, protobuf, numpy and
Pillow only (``pip install saliency-serve``; the server is the ``server`` extra).

Example:
    >>> from service.client import SaliencyClient, decode_map, decode_mask
    >>> with SaliencyClient("localhost:50051") as client:
    ...     reply = client.explain("cat.png", methods=["grad_cam", "smoothgrad"], top_k=1)
    ...     for item in reply.explanations:
    ...         saliency = decode_map(item.map)      # float32 (H, W)
    ...         mask = decode_mask(item.mask)        # bool (H, W)

``explain_stream`` yields the prediction, then each explanation and its scores as they
complete; a slow method's ``refinement`` parts (its maps so far) come before its
explanation, and :class:`LatestMaps` keeps the newest map of each.
``AsyncSaliencyClient`` has the same methods for ``asyncio`` (``grpc.aio``). A gateway with
TLS and tokens: ``SaliencyClient(address, credentials=tls_credentials("ca.pem"),
token="...")`` (add ``client_cert`` and ``client_key`` for mutual TLS).
"""

from service.client.aio import AsyncSaliencyClient
from service.client.anytime import LatestMaps, collect_stream, map_key
from service.client.decode import decode_map, decode_mask, decode_rgb
from service.client.messages import (
    MethodArg,
    concepts_request,
    domain_error,
    explain_request,
    predict_request,
    tls_credentials,
    visualize_request,
)
from service.client.overlay import draw_box, overlay
from service.client.sync import SaliencyClient

__all__ = [
    "AsyncSaliencyClient",
    "LatestMaps",
    "MethodArg",
    "SaliencyClient",
    "collect_stream",
    "concepts_request",
    "decode_map",
    "decode_mask",
    "decode_rgb",
    "domain_error",
    "draw_box",
    "explain_request",
    "map_key",
    "overlay",
    "predict_request",
    "tls_credentials",
    "visualize_request",
]
