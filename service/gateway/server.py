"""The gateway process: grpc.aio server on :50051 in front of TorchServe's gRPC on localhost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.http.app import HttpSettings
from service.gateway.http.front import HttpFront
from service.gateway.interceptors import ErrorAndMetricsInterceptor
from service.gateway.metrics import GatewayMetrics
from service.gateway.servicer import ExplainServicer
from service.gateway.upstream import TorchServeClient
from service.protocol.limits import GATEWAY_RECEIVE_BYTES, MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExplainService"].full_name


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens and what it fronts.

    Attributes:
        host, port: gRPC listen address (port 0 picks a free one).
        metrics_host, metrics_port: Prometheus ``/metrics`` (port 0 picks a free one).
        upstream: TorchServe gRPC inference address.
        models: served model names; the first is the default.
        max_message_bytes: largest request accepted (RESOURCE_EXHAUSTED above it).
        health_interval_s: how often TorchServe's readiness is polled.
        http_port: HTTP/JSON API and web page on ``host`` at this port (0 picks a free
            one); ``None``: no HTTP.
    """

    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9464
    upstream: str = "127.0.0.1:7070"
    models: tuple[str, ...] = ("shapes",)
    max_message_bytes: int = GATEWAY_RECEIVE_BYTES
    health_interval_s: float = 2.0
    http_port: int | None = None


class Gateway:
    """A started gateway; ``await stop()`` shuts it down."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.upstream = TorchServeClient(config.upstream)
        self.health = health.aio.HealthServicer()
        self.servicer = ExplainServicer(self.upstream, config.models, self.metrics)
        self.server = grpc.aio.server(
            interceptors=[ErrorAndMetricsInterceptor(self.metrics, self.servicer.model_label)],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.http = (
            HttpFront(
                config.host, config.http_port, HttpSettings(config.models, config.max_message_bytes)
            )
            if config.http_port is not None
            else None
        )
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pb_grpc.add_ExplainServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        self._metrics_server, _ = start_http_server(
            self.config.metrics_port, addr=self.config.metrics_host, registry=self.metrics.registry
        )
        self.metrics_port = self._metrics_server.server_port
        await self._set_serving(await self.upstream.healthy())
        if self.http is not None:  # HTTP calls come in through the same server
            self.server.add_insecure_port(self.http.internal_address)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        self._poller = asyncio.create_task(self._poll_health())

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self._set_serving(await self.upstream.healthy())
            self.upstream.cancels.sweep()

    async def _set_serving(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.upstream_ready.set(1 if ready else 0)

    async def stop(self, grace: float = 5.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop(grace)
        await self.server.stop(grace)
        await self.upstream.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # stops serving; the socket stays bound until
            self._metrics_server.server_close()  # closed here, not when it is collected


async def start_gateway(config: GatewayConfig) -> Gateway:
    gateway = Gateway(config)
    await gateway.start()
    logger.info(
        "gateway on %s:%d, metrics on :%d, upstream %s",
        config.host,
        gateway.port,
        gateway.metrics_port,
        config.upstream,
    )
    return gateway


async def run_gateway(config: GatewayConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or forever)."""
    gateway = await start_gateway(config)
    print(
        f"gateway: gRPC {config.host}:{gateway.port}, metrics "
        f"http://{config.metrics_host}:{gateway.metrics_port}/metrics",
        flush=True,
    )
    if gateway.http is not None:
        print(f"web page and HTTP/JSON: {gateway.http.url}", flush=True)
    try:
        await (stop.wait() if stop else asyncio.Event().wait())
    finally:
        await gateway.stop()
