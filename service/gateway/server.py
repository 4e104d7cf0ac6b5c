"""The gateway process: grpc.aio server on :50051 in front of TorchServe's gRPC on localhost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.admission import Admission, PoolSize
from service.gateway.auth import TokenAuthInterceptor, TokenFile
from service.gateway.health import BackendHealth
from service.gateway.http.front import front_of
from service.gateway.interceptors import ErrorAndMetricsInterceptor
from service.gateway.memory import HeapTrimmer
from service.gateway.metrics import GatewayMetrics
from service.gateway.servicer import ExplainServicer
from service.gateway.upstream import KeyFile, TorchServeClient
from service.protocol.limits import GATEWAY_RECEIVE_BYTES, MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExplainService"].full_name
LOOPBACK = "127.0.0.1"
DEFAULT_POOL = PoolSize(workers=2, batch_size=4)
"""The default archive's pools (``service.archive.BatchConfig``)."""


@dataclass(frozen=True)
class TLSConfig:
    """The gateway's certificate, and the CA its clients' certificates must chain to.

    Attributes:
        cert, key: PEM files of the server certificate (chain) and its private key.
        client_ca: PEM file of the CA for mutual TLS; ``None``: clients need no certificate.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, what it fronts, and who may call it.

    Attributes:
        host, port: gRPC listen address (port 0 picks a free one).
        metrics_host, metrics_port: Prometheus ``/metrics`` (port 0 picks a free one);
            loopback unless told otherwise: its labels describe the traffic.
        upstream: TorchServe gRPC inference address.
        upstream_key_file: TorchServe's ``key_file.json`` (its inference key); ``None``
            when TorchServe's token authorization is off.
        models: served model names; the first is the default.
        split_pools: each model has a forward-only twin in TorchServe for Predict.
        explain_pool, predict_pool: the pools' workers and batch sizes, what the
            in-flight bounds are sized from (:class:`~service.gateway.admission.Admission`).
        batches_per_worker: queued batches per worker the bounds allow.
        max_in_flight: explicit bounds per kind (``explain``, ``predict``), overriding
            the sized ones.
        max_concurrent_rpcs: calls (of any kind, health included) the transport takes at
            once; above it gRPC refuses them with RESOURCE_EXHAUSTED before the gateway
            allocates anything. ``None``: four times the in-flight bounds' sum, at least
            256 (room for the calls admission itself refuses, and for health checks).
        trim_heap: give free heap back to the system when idle after traffic
            (:class:`~service.gateway.memory.HeapTrimmer`).
        max_message_bytes: largest request accepted (RESOURCE_EXHAUSTED above it).
        health_interval_s, health_stale_after_s: see :class:`BackendHealth`.
        health_port: also serve grpc.health.v1 alone, in plaintext, on loopback at this
            port (``None``: not): in-container probes of a TLS or mTLS gateway need no
            certificate, and it exposes nothing but health.
        tls: serve TLS (and mutual TLS) instead of plaintext.
        auth_token_file: accepted bearer tokens (:class:`TokenFile`); ``None``: no auth.
        reflection: serve gRPC reflection (off: it lists the API to anyone who asks).
        http_port: HTTP/JSON and the web page on ``host``, same TLS and tokens (None: off).
    """

    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = LOOPBACK
    metrics_port: int = 9464
    upstream: str = "127.0.0.1:7070"
    upstream_key_file: Path | None = None
    models: tuple[str, ...] = ("shapes",)
    split_pools: bool = True
    explain_pool: PoolSize = DEFAULT_POOL
    predict_pool: PoolSize = DEFAULT_POOL
    batches_per_worker: int = 4
    max_in_flight: dict[str, int] = field(default_factory=dict)
    max_concurrent_rpcs: int | None = None
    trim_heap: bool = True
    max_message_bytes: int = GATEWAY_RECEIVE_BYTES
    health_interval_s: float = 1.0
    health_stale_after_s: float = 10.0
    health_port: int | None = None
    tls: TLSConfig | None = None
    auth_token_file: Path | None = None
    reflection: bool = False
    http_port: int | None = None

    def admission(self) -> Admission:
        sized = Admission.sized(self.explain_pool, self.predict_pool, self.batches_per_worker)
        return Admission({**sized.limits, **self.max_in_flight})


class Gateway:
    """A started gateway; ``await stop()`` shuts it down."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.health = health.aio.HealthServicer()
        key = KeyFile(config.upstream_key_file) if config.upstream_key_file else None
        self.upstream = TorchServeClient(
            config.upstream,
            key=key,
            on_answer=self._answered,
            on_retry=lambda model: self.metrics.upstream_retries.labels(model).inc(),
        )
        self.backend = BackendHealth(
            self.upstream,
            config.models,
            self.health,
            self.metrics,
            api_service=SERVICE_NAME,
            split_pools=config.split_pools,
            interval_s=config.health_interval_s,
            stale_after_s=config.health_stale_after_s,
        )
        self.admission = config.admission()
        self.servicer = ExplainServicer(
            self.upstream,
            config.models,
            self.metrics,
            self.admission,
            split_pools=config.split_pools,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = []
        tokens = TokenFile(config.auth_token_file) if config.auth_token_file else None
        if tokens is not None:  # outermost: a refused call costs nothing
            interceptors.append(TokenAuthInterceptor(tokens))
        calls = ErrorAndMetricsInterceptor(self.metrics, self.servicer.model_label)
        interceptors.append(calls)
        self.trimmer = HeapTrimmer(lambda: calls.active, lambda: calls.started)
        bound = sum(self.admission.limits.values())
        self.server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs or max(256, 4 * bound),
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.http = front_of(config, tokens.accepts if tokens else None)
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._health_server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._poller: asyncio.Task[None] | None = None

    def _answered(self, ts_model: str) -> None:
        self.backend.answered_now(ts_model)

    async def start(self) -> None:
        pb_grpc.add_ExplainServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_name, reflection.SERVICE_NAME), self.server
            )
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls is not None:
            self.port = self.server.add_secure_port(address, self.config.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._metrics_server, _ = start_http_server(
            self.config.metrics_port, addr=self.config.metrics_host, registry=self.metrics.registry
        )
        self.metrics_port = self._metrics_server.server_port
        if self.config.health_port is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(
                f"{LOOPBACK}:{self.config.health_port}"
            )
            await self._health_server.start()
        await self.backend.first_round(timeout=5.0)
        if self.http is not None:  # HTTP calls come in through the same server
            self.server.add_insecure_port(self.http.internal_address)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        chores = [
            asyncio.create_task(self._sweep_cancel_marks()),
        ]
        if self.config.trim_heap:
            chores.append(asyncio.create_task(self.trimmer.run()))
        try:
            await self.backend.run()
        finally:
            for chore in chores:
                chore.cancel()

    async def _sweep_cancel_marks(self) -> None:
        while True:
            await asyncio.sleep(60.0)
            await asyncio.to_thread(self.upstream.cancels.sweep)

    async def backend_down(self) -> None:
        """Report NOT_SERVING at once (the supervisor saw TorchServe exit)."""
        self.backend.frontend_up = False
        await self.backend.publish()

    async def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, let the calls in flight finish (up to ``grace`` s), stop."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.backend.close()
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop(grace)
        await self.server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.upstream.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # stops serving; the socket stays bound until
            self._metrics_server.server_close()  # closed here, not when it is collected


async def start_gateway(config: GatewayConfig) -> Gateway:
    gateway = Gateway(config)
    await gateway.start()
    logger.info(
        "gateway on %s:%d (%s), metrics on %s:%d, upstream %s",
        config.host,
        gateway.port,
        "TLS" if config.tls else "plaintext",
        config.metrics_host,
        gateway.metrics_port,
        config.upstream,
    )
    return gateway


def describe(config: GatewayConfig, gateway: Gateway) -> str:
    """The line ``serve`` and ``gateway`` print once listening."""
    security = [
        "mTLS" if config.tls and config.tls.client_ca else "TLS" if config.tls else "plaintext",
        "token auth" if config.auth_token_file else "no auth",
    ]
    line = (
        f"gateway: gRPC {config.host}:{gateway.port} ({', '.join(security)}), metrics "
        f"http://{config.metrics_host}:{gateway.metrics_port}/metrics"
    )
    if gateway.http is not None:
        line += f"\nweb page and HTTP/JSON: {gateway.http.url}"
    return line


async def run_gateway(
    config: GatewayConfig, stop: asyncio.Event | None = None, grace: float = 5.0
) -> None:
    """Run until ``stop`` is set (or forever), then drain for up to ``grace`` seconds."""
    gateway = await start_gateway(config)
    print(describe(config, gateway), flush=True)
    try:
        await (stop.wait() if stop else asyncio.Event().wait())
    finally:
        await gateway.stop(grace)
