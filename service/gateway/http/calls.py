"""What every HTTP API call shares: its body under limits, its deadline, its credentials,
and its failure as a JSON error with the HTTP status of its gRPC code.

The calls themselves are made over gRPC, to the gateway's own server
(:class:`~service.gateway.http.front.HttpFront`), so a failure arrives as a status code
name and a bounded message: the same ones a gRPC client would read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from service.protocol.errors import (
    PAYLOAD_TOO_LARGE,
    EngineError,
    InvalidInputError,
    code_name,
    http_status,
    message_of,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED = 499
"""Status logged for a call whose client went away (nobody reads it)."""
REQUEST_TIMEOUT = 408
MAX_TIMEOUT_S = 3600.0
"""Largest ``timeout`` a call may ask for; the model worker caps its work further."""


class HttpError(Exception):
    """A refusal the HTTP front makes itself, with its gRPC code name and HTTP status."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status if status is not None else http_status(code)


class ClientGone(Exception):
    """The HTTP client disconnected; the call behind was cancelled."""


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON error of an exception: ``{"error": {"code": ..., "message": ...}}``."""
    if isinstance(exc, HttpError):
        code, message, status = exc.code, str(exc), exc.status
    elif isinstance(exc, grpc.aio.AioRpcError):
        code, message = exc.code().name, exc.details() or exc.code().name
        status = http_status(code)
    elif isinstance(exc, EngineError):
        code, message = code_name(exc), message_of(exc)
        status = http_status(code)
    else:
        logger.exception("unexpected error in the HTTP front", exc_info=exc)
        code, message, status = "INTERNAL", "internal error (see server logs)", 500
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


@dataclass(frozen=True)
class CallContext:
    """One HTTP API call's deadline and the metadata passed to the gRPC call behind it."""

    deadline: float | None
    metadata: tuple[tuple[str, str], ...]

    def timeout(self) -> float | None:
        """Seconds left until the deadline (what the gRPC call behind gets)."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)


def call_context(request: Request, authorize: Callable[[str | None], bool] | None) -> CallContext:
    """The call's credentials checked and its ``timeout`` query parameter read.

    ``timeout`` is in seconds (``?timeout=2.5``), as gRPC deadlines are; without one the
    call has none, like a gRPC call without a deadline (the model worker then applies its
    default). The ``authorization`` header goes on to the gRPC call, whose interceptor
    checks it again: an HTTP call is let in exactly when a gRPC call would be.
    """
    header = request.headers.get("authorization")
    if authorize is not None and not authorize(header):
        problem = "missing" if header is None else "invalid"
        raise HttpError(
            "UNAUTHENTICATED", f"{problem} credentials: send 'Authorization: Bearer <token>'"
        )
    raw = request.query_params.get("timeout")
    deadline = None
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
            raise InvalidInputError(
                f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {raw[:40]!r}"
            )
        deadline = time.monotonic() + seconds
    metadata = (("authorization", header),) if header is not None else ()
    return CallContext(deadline, metadata)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes
    (from ``Content-Length``, before reading any of it) and with 408 when it does not
    arrive within ``timeout_s`` (a client trickling bytes holds no slot for long)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInputError(f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise HttpError(
            "DEADLINE_EXCEEDED", f"the body did not arrive within {timeout_s:g} s", REQUEST_TIMEOUT
        ) from None
    except ClientDisconnect:
        raise ClientGone from None
    return b"".join(chunks)


def _too_large(limit: int) -> HttpError:
    return HttpError(
        "RESOURCE_EXHAUSTED",
        f"the request body is over {limit:,} bytes, this server's limit (an image's base64 "
        "is 4/3 of its size): send a smaller image",
        PAYLOAD_TOO_LARGE,
    )


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (after the body was read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or :class:`ClientGone` (``work`` cancelled, and with it the gRPC
    call and the model worker's job) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone
    return task.result()


async def all_or_none(calls: list[Awaitable[T]]) -> list[T]:
    """Every call's result, in order; the first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_awaited(call)) for call in calls]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def _awaited(call: Awaitable[T]) -> T:
    return await call
