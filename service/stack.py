"""The whole stack on this host, for tests and benchmarks: TorchServe, then the gateway.

Both listen on free loopback ports, so a stack started here runs beside ``make serve`` or
another stack; TorchServe gets its own run directory and temp directory (its pid file and
worker sockets live there), and everything is stopped when the ``with`` block ends, also
when it raises::

    with running_stack(model_store, {"shapes": "shapes.mar"}) as stack:
        client = SaliencyClient(stack.gateway.address)

The pieces serve callers that need them apart (a test session holding TorchServe in one
fixture and the gateway in another, a benchmark measuring the model in process before it
starts the gateway): :func:`running_torchserve` and :func:`running_gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.gateway.server import Gateway, GatewayConfig, start_gateway
from service.launcher import TorchServe, TorchServePorts

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RunningGateway:
    """A started gateway and where to reach it."""

    gateway: Gateway

    @property
    def address(self) -> str:
        """``host:port`` of its gRPC listener."""
        return f"{LOOPBACK}:{self.gateway.port}"

    @property
    def http_url(self) -> str:
        """Its HTTP/JSON API and web page, ``http://127.0.0.1:PORT`` (no trailing /)."""
        assert self.gateway.http is not None, "this gateway serves no HTTP"
        return f"http://{LOOPBACK}:{self.gateway.http.port}"

    @property
    def metrics_url(self) -> str:
        """Its Prometheus ``/metrics`` page."""
        return f"http://{LOOPBACK}:{self.gateway.metrics_port}/metrics"


@dataclass(frozen=True)
class Stack:
    """A ready TorchServe and the gateway in front of it."""

    torchserve: TorchServe
    gateway: RunningGateway


@contextlib.contextmanager
def running_torchserve(
    model_store: Path,
    models: Mapping[str, str],
    run_dir: Path | None = None,
    *,
    settings: Mapping[str, object] | None = None,
    ready_timeout: float = 240.0,
) -> Iterator[TorchServe]:
    """TorchServe on free loopback ports, every model with a READY worker; stopped after.

    Args:
        model_store: folder of ``.mar`` files.
        models: served name -> ``.mar`` file name.
        run_dir: configuration, logs and private temp directory; a fresh temporary one
            (removed after) when omitted.
        settings: extra ``config.properties`` entries.
        ready_timeout: seconds to wait for the workers.

    Raises:
        RuntimeError: TorchServe exited while starting.
        TimeoutError: no READY worker within ``ready_timeout``.
    """
    with contextlib.ExitStack() as cleanup:
        if run_dir is None:
            run_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ts-run-")))
        server = TorchServe(
            Path(model_store), dict(models), run_dir, TorchServePorts.free(), settings=settings
        )
        server.start()
        cleanup.callback(server.stop)
        server.wait_ready(timeout=ready_timeout)
        yield server


@contextlib.contextmanager
def gateway_in_thread(config: GatewayConfig) -> Iterator[Gateway]:
    """A started gateway on its own asyncio loop in a daemon thread; stopped after."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
    thread.start()
    try:
        # grpc.aio objects belong to the loop they are made on: make them on this one.
        gateway = asyncio.run_coroutine_threadsafe(start_gateway(config), loop).result(60)
        try:
            yield gateway
        finally:
            asyncio.run_coroutine_threadsafe(gateway.stop(grace=1), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@contextlib.contextmanager
def running_gateway(
    upstream: str, models: Sequence[str], *, health_interval_s: float = 0.5
) -> Iterator[RunningGateway]:
    """The gateway on free loopback ports in front of ``upstream``; stopped after.

    Args:
        upstream: TorchServe's gRPC inference address (:attr:`TorchServe.grpc_address`),
            or a stand-in's.
        models: the served model names; the first is the default.
        health_interval_s: how often the gateway polls the upstream's readiness.
    """
    config = GatewayConfig(
        host=LOOPBACK,
        port=0,
        metrics_host=LOOPBACK,
        metrics_port=0,
        upstream=upstream,
        models=tuple(models),
        health_interval_s=health_interval_s,
        http_port=0,
    )
    with gateway_in_thread(config) as gateway:
        yield RunningGateway(gateway)


@contextlib.contextmanager
def running_stack(
    model_store: Path,
    models: Mapping[str, str],
    run_dir: Path | None = None,
    *,
    settings: Mapping[str, object] | None = None,
    ready_timeout: float = 240.0,
    health_interval_s: float = 0.5,
) -> Iterator[Stack]:
    """:func:`running_torchserve` and :func:`running_gateway` in front of it, as one."""
    with (
        running_torchserve(
            model_store, models, run_dir, settings=settings, ready_timeout=ready_timeout
        ) as torchserve,
        running_gateway(
            torchserve.grpc_address, list(torchserve.models), health_interval_s=health_interval_s
        ) as gateway,
    ):
        yield Stack(torchserve, gateway)
