"""The HTTP front: uvicorn on the gateway's event loop, a client of the gateway's own gRPC.

Each HTTP API call becomes a gRPC call to the gateway's server over a Unix socket in a
private directory (mode 0700: no other user can reach it). So an HTTP call meets exactly
what a gRPC call meets -- the interceptors (token check, error mapping, latency metrics
with the same labels), admission, the message size limit, the servicer -- with no second
copy of any of it to keep in step. The price is one local hop per call: a protobuf
serialization and a socket round trip. With JSON and base64 on top, an HTTP call takes
about 2 ms longer than the same gRPC call at the median, at the same throughput
(``bench/results/http.md``).

uvicorn runs inside the gateway's asyncio loop (one process, beside grpc.aio), started
and stopped through its ``Server`` steps rather than ``Server.serve``, which would take
over SIGINT and SIGTERM from the process that owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any, Protocol

import grpc
import uvicorn

from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.http.app import Authorize, HttpSettings, build_app
from service.protocol.limits import MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class TLSFiles(Protocol):
    """A certificate, its key, and the CA of client certificates (mutual TLS) or None:
    what the gateway's gRPC listener serves, which the HTTP listener serves too."""

    @property
    def cert(self) -> Path: ...
    @property
    def key(self) -> Path: ...
    @property
    def client_ca(self) -> Path | None: ...


class FrontConfig(Protocol):
    """What the HTTP front takes from the gateway's configuration
    (:class:`~service.gateway.server.GatewayConfig`)."""

    @property
    def host(self) -> str: ...
    @property
    def http_port(self) -> int | None: ...
    @property
    def models(self) -> tuple[str, ...]: ...
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def tls(self) -> TLSFiles | None: ...


def uvicorn_tls(tls: TLSFiles) -> dict[str, Any]:
    """uvicorn's options for ``tls``: HTTPS, requiring client certificates under mTLS."""
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.client_ca is not None:
        options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


class HttpFront:
    """The HTTP listener of one gateway.

    Args:
        host, port: where it listens (port 0 picks a free one).
        settings: the API's limits and token check.
        tls: serve HTTPS; ``None``: plain HTTP.
        target: the gateway's gRPC address to call, plaintext; ``None``: a Unix socket
            of its own (``internal_address``), which the gateway's server must also
            listen on before it starts. :meth:`start` after the server did.
    """

    def __init__(
        self,
        host: str,
        port: int,
        settings: HttpSettings,
        tls: TLSFiles | None = None,
        target: str | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.settings = settings
        self.tls = tls
        self._dir = Path(tempfile.mkdtemp(prefix="saliency-http-"))  # 0700
        self.internal_address = target or f"unix:{self._dir / 'gateway.sock'}"
        self.port = 0
        self._channel: grpc.aio.Channel | None = None
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Where a browser on this host finds the page (loopback when bound to all)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.internal_address, options=CHANNEL_OPTIONS)
        app = build_app(pb_grpc.ExplainServiceStub(self._channel), self.settings)
        config = uvicorn.Config(
            app,
            http="h11",
            ws="none",
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
            **(uvicorn_tls(self.tls) if self.tls else {}),
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        self._socket = _bind(self.host, self.requested_port)
        self.port = self._socket.getsockname()[1]
        await server.startup(sockets=[self._socket])
        self._server = server
        self._ticker = asyncio.create_task(server.main_loop())  # date header, exit flag

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking connections, let calls in flight finish for up to ``grace`` s."""
        if self._server is not None:
            self._server.config.timeout_graceful_shutdown = max(int(grace), 1)
            self._server.should_exit = True
            if self._ticker is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._ticker
            await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        if self._channel is not None:
            await self._channel.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def front_of(config: FrontConfig, authorize: Authorize | None) -> HttpFront | None:
    """The gateway's HTTP front: its host, its TLS files, its models and message limit,
    and ``authorize`` (the gRPC token check's own function, so both accept the same
    tokens); ``None`` when ``config.http_port`` is."""
    if config.http_port is None:
        return None
    settings = HttpSettings(config.models, config.max_message_bytes, authorize)
    return HttpFront(config.host, config.http_port, settings, tls=config.tls)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv6 when ``host`` is one); OSError says where it failed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP,
    # and with Nagle on every keep-alive response waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"HTTP: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
