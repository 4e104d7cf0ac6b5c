"""Bearer-token authentication of every call but health checks.

Clients send ``authorization: Bearer <token>`` metadata. The accepted tokens are the
non-empty lines of a file (a Kubernetes Secret mounted as a file, typically), read again
when the file changes, so tokens rotate without a restart. Each presented token is
compared with every accepted one in constant time (``hmac.compare_digest``), all of them
every time, so the answer's timing says nothing about which bytes matched. A call without
a valid token is answered UNAUTHENTICATED before its handler runs. Health checks stay
open: probes (the kubelet's, a load balancer's) carry no token.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
SCHEME = "bearer "
RELOAD_EVERY_S = 1.0


class TokenFile:
    """The accepted tokens: the file's non-empty lines that are not ``#`` comments."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.tokens: tuple[bytes, ...] = ()
        self._reload()
        if not self.tokens:
            raise ValueError(f"{path} holds no token: every call would be refused")

    def _reload(self) -> None:
        stat = os.stat(self.path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        lines = self.path.read_text().splitlines()
        self.tokens = tuple(
            line.strip().encode() for line in lines if line.strip() and not line.startswith("#")
        )
        self._stamp = stamp

    def current(self) -> tuple[bytes, ...]:
        """The tokens, re-read at most once a second when the file changed."""
        now = time.monotonic()
        if now - self._checked >= RELOAD_EVERY_S:
            self._checked = now
            try:
                self._reload()
            except OSError:  # mid-rotation: keep the tokens we have
                logger.warning("cannot read the token file %s; keeping the last tokens", self.path)
        return self.tokens

    def accepts(self, header: str | bytes | None) -> bool:
        """Whether an ``authorization`` value carries one of the tokens."""
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if not header or header[: len(SCHEME)].lower() != SCHEME:
            return False
        presented = header[len(SCHEME) :].strip().encode("utf-8", "replace")
        matched = False
        for token in self.current():  # no early exit: the same work whichever matches
            matched |= hmac.compare_digest(presented, token)
        return matched


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED without reading the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - an async generator for the streaming shapes

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks that lacks a token of ``tokens``."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization")
        if header is None:
            return _refusal(handler, "missing credentials: send 'authorization: Bearer <token>'")
        if not self.tokens.accepts(header):
            return _refusal(handler, "invalid credentials: the bearer token is not accepted")
        return handler
