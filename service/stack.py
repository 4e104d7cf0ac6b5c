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
from typing import Any

import grpc

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
    split_pools: bool = True,
    predict_workers: int | None = None,
) -> Iterator[TorchServe]:
    """TorchServe on free loopback ports, every model with a READY worker; stopped after.

    Args:
        model_store: folder of ``.mar`` files.
        models: served name -> ``.mar`` file name.
        run_dir: configuration, logs and private temp directory; a fresh temporary one
            (removed after) when omitted.
        settings: extra ``config.properties`` entries.
        ready_timeout: seconds to wait for the workers.
        split_pools, predict_workers: see :class:`~service.launcher.TorchServe`.

    Raises:
        RuntimeError: TorchServe exited while starting.
        TimeoutError: no READY worker within ``ready_timeout``.
    """
    with contextlib.ExitStack() as cleanup:
        if run_dir is None:
            run_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ts-run-")))
        server = TorchServe(
            Path(model_store),
            dict(models),
            run_dir,
            TorchServePorts.free(),
            settings=settings,
            split_pools=split_pools,
            predict_workers=predict_workers,
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
    upstream: str, models: Sequence[str], *, health_interval_s: float = 0.5, **options: Any
) -> Iterator[RunningGateway]:
    """The gateway on free loopback ports in front of ``upstream``; stopped after.

    Args:
        upstream: TorchServe's gRPC inference address (:attr:`TorchServe.grpc_address`),
            or a stand-in's.
        models: the served model names; the first is the default.
        health_interval_s: how often the gateway checks the upstream.
        options: more :class:`~service.gateway.server.GatewayConfig` fields (TLS, tokens,
            pool sizes...).
    """
    config = GatewayConfig(
        host=LOOPBACK,
        port=0,
        metrics_host=LOOPBACK,
        metrics_port=0,
        upstream=upstream,
        models=tuple(models),
        health_interval_s=health_interval_s,
        **{"http_port": 0, **options},
    )
    with gateway_in_thread(config) as gateway:
        yield RunningGateway(gateway)


class _Key(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds TorchServe's inference key to every call."""

    def __init__(self, torchserve: TorchServe) -> None:
        self.torchserve = torchserve

    def _with_key(self, details: Any) -> Any:
        key = ("authorization", f"Bearer {self.torchserve.key('inference')}")
        return details._replace(metadata=(*(details.metadata or ()), key))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)


def torchserve_channel(torchserve: TorchServe) -> grpc.Channel:
    """A blocking channel to TorchServe's gRPC inference API that sends its key, for the
    callers that talk to TorchServe directly (tests of the handler, benchmarks)."""
    return grpc.intercept_channel(grpc.insecure_channel(torchserve.grpc_address), _Key(torchserve))


def gateway_options(torchserve: TorchServe) -> dict[str, Any]:
    """The :class:`GatewayConfig` fields that a gateway in front of ``torchserve`` needs:
    its key file, whether it split the pools, and the pools' sizes."""
    explain, predict = torchserve.pools(next(iter(torchserve.models)))
    return {
        "upstream_key_file": torchserve.key_file,
        "split_pools": torchserve.split_pools,
        "explain_pool": explain,
        "predict_pool": predict,
    }


@contextlib.contextmanager
def running_stack(
    model_store: Path,
    models: Mapping[str, str],
    run_dir: Path | None = None,
    *,
    settings: Mapping[str, object] | None = None,
    ready_timeout: float = 240.0,
    health_interval_s: float = 0.5,
    predict_workers: int | None = None,
    **gateway: Any,
) -> Iterator[Stack]:
    """:func:`running_torchserve` and :func:`running_gateway` in front of it, as one.

    ``gateway`` holds more :class:`~service.gateway.server.GatewayConfig` fields.
    """
    with running_torchserve(
        model_store,
        models,
        run_dir,
        settings=settings,
        ready_timeout=ready_timeout,
        predict_workers=predict_workers,
    ) as torchserve:
        options = {**gateway_options(torchserve), **gateway}
        with running_gateway(
            torchserve.grpc_address,
            list(torchserve.models),
            health_interval_s=health_interval_s,
            **options,
        ) as front:
            yield Stack(torchserve, front)
