"""The HTTP/JSON API (KServe v1 paths) and the web page, as one Starlette app.

| path | what |
|---|---|
| ``GET /`` | the web page (``static/``: HTML, a JS module, CSS; nothing from elsewhere) |
| ``GET /v1/models`` | ``{"models": [names]}`` |
| ``GET /v1/models/{m}`` | ``GetModelInfo`` as JSON: ``name``, ``ready``, labels, methods |
| ``POST /v1/models/{m}:predict`` | ``Predict`` per instance: ``{"predictions": [...]}`` |
| ``POST /v1/models/{m}:explain`` | ``Explain`` per instance: ``{"explanations": [...]}`` |
| ``POST /v1/models/{m}:explain?stream=true`` | ``ExplainStream``: server-sent events |

Every API call is made over gRPC to the gateway's own server (see
:mod:`service.gateway.http.front`): its limits, admission, deadlines, metrics, token
check and error mapping are the gRPC path's, not a copy of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.http import kserve, replies
from service.gateway.http.calls import (
    CLIENT_CLOSED,
    CallContext,
    ClientGone,
    HttpError,
    all_or_none,
    call_context,
    error_response,
    read_body,
    unless_gone,
)
from service.gateway.http.stream import EventStream
from service.protocol.errors import InvalidInputError, clip

STATIC = Path(__file__).with_name("static")
JSON_OVERHEAD_BYTES = 64 * 1024
"""Room in a body for the JSON around its images' base64."""
SECURITY_HEADERS = [
    # The page loads nothing from anywhere but this server (no CDN), and images only from
    # itself or the data: and blob: URLs it makes.
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
        b"base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
Authorize = Callable[[str | None], bool]


class ModelName(Convertor[str]):
    """A model name in a path: no ``/`` and no ``:`` (the verb follows one)."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model_name", ModelName())


@dataclass(frozen=True)
class HttpSettings:
    """What the HTTP front allows.

    Attributes:
        models: served model names (any other name in a path is 404).
        max_message_bytes: the gRPC server's request limit; a body may carry its base64.
        authorize: the token check of an ``authorization`` header; ``None``: no auth.
        max_in_flight: API calls served at once; above, RESOURCE_EXHAUSTED (429) before
            the body is read, so a burst of large bodies cannot fill the gateway's memory.
        body_timeout_s: time a body may take to arrive (408 after).
    """

    models: tuple[str, ...]
    max_message_bytes: int
    authorize: Authorize | None = None
    max_in_flight: int = 256
    body_timeout_s: float = 30.0

    @property
    def max_body_bytes(self) -> int:
        return self.max_message_bytes * 4 // 3 + JSON_OVERHEAD_BYTES


class Api:
    """The API endpoints over a stub of the gateway's own gRPC server."""

    def __init__(self, stub: pb_grpc.ExplainServiceStub, settings: HttpSettings) -> None:
        self.stub = stub
        self.settings = settings
        self.in_flight = 0

    def _model(self, request: Request) -> str:
        name = request.path_params["model"]
        if name not in self.settings.models:
            raise HttpError(
                "NOT_FOUND",
                f"model {clip(name)} is not served here (served: "
                f"{', '.join(self.settings.models)})",
            )
        return name

    async def list_models(self, request: Request) -> Response:
        call_context(request, self.settings.authorize)
        return JSONResponse({"models": list(self.settings.models)})

    async def model(self, request: Request) -> Response:
        context = call_context(request, self.settings.authorize)
        call = self.stub.GetModelInfo(
            pb.GetModelInfoRequest(model=self._model(request)),
            timeout=context.timeout(),
            metadata=context.metadata,
        )
        return JSONResponse(replies.model_json(await unless_gone(request, call)))

    async def predict(self, request: Request) -> Response:
        context, body = await self._begin(request)
        requests = kserve.predict_requests(body, self._model(request))
        self._fits(requests)
        calls = [
            self.stub.Predict(r, timeout=context.timeout(), metadata=context.metadata)
            for r in requests
        ]
        answers = await unless_gone(request, all_or_none(calls))
        return JSONResponse({"predictions": [replies.predict_json(r) for r in answers]})

    async def explain(self, request: Request) -> Response:
        context, body = await self._begin(request)
        requests = kserve.explain_requests(body, self._model(request))
        self._fits(requests)
        if _flag(request, "stream"):
            if len(requests) != 1:
                raise InvalidInputError("stream=true explains one instance per call")
            return await self._stream(request, requests[0], context)
        calls = [
            self.stub.Explain(r, timeout=context.timeout(), metadata=context.metadata)
            for r in requests
        ]
        answers = await unless_gone(request, all_or_none(calls))
        return JSONResponse({"explanations": [replies.explain_json(r) for r in answers]})

    async def _stream(
        self, request: Request, message: pb.ExplainRequest, context: CallContext
    ) -> Response:
        call = self.stub.ExplainStream(
            message, timeout=context.timeout(), metadata=context.metadata
        )
        try:
            first = await unless_gone(request, call.read())
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            raise HttpError("INTERNAL", "the stream ended before its first part")
        return EventStream(call, first)  # type: ignore[return-value]

    async def _begin(self, request: Request) -> tuple[CallContext, Any]:
        """Credentials and deadline checked, then the body read under its limits."""
        context = call_context(request, self.settings.authorize)
        self._model(request)
        body = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        return context, kserve.parse_json(body)

    def _fits(self, requests: list[Any]) -> None:
        """Each message within the gRPC server's limit: over it is the body's fault (413)."""
        for message in requests:
            if message.ByteSize() > self.settings.max_message_bytes:
                raise HttpError(
                    "RESOURCE_EXHAUSTED",
                    f"an image is over {self.settings.max_message_bytes:,} bytes, this "
                    "server's limit: send a smaller image",
                    413,
                )


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise InvalidInputError(f"{name} must be true or false, got {clip(raw)}")
    return raw in ("true", "1")


def endpoint(api: Api, work: Callable[[Request], Awaitable[Response]], counted: bool) -> Any:
    """``work`` with its failures as JSON errors; ``counted`` calls hold an in-flight slot."""

    async def run(request: Request) -> Response:
        if counted and api.in_flight >= api.settings.max_in_flight:
            return error_response(
                HttpError(
                    "RESOURCE_EXHAUSTED",
                    f"{api.in_flight} HTTP calls in flight, this server's limit: retry "
                    "with backoff",
                )
            )
        api.in_flight += counted
        try:
            return await work(request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:
            return error_response(exc)
        finally:
            api.in_flight -= counted

    return run


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


async def refusal(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(status, "INVALID_ARGUMENT")
    message = f"no {request.method} {clip(request.url.path)} here: see /v1/models"
    response = error_response(HttpError(code, message, status))
    if status == 405 and isinstance(exc, HTTPException) and exc.headers:
        response.headers.update(exc.headers)
    return response


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def build_app(stub: pb_grpc.ExplainServiceStub, settings: HttpSettings) -> ASGIApp:
    """The Starlette app of the HTTP front."""
    api = Api(stub, settings)
    model = "/v1/models/{model:model_name}"
    routes = [
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/v1/models", endpoint(api, api.list_models, False), methods=["GET"]),
        Route(f"{model}:predict", endpoint(api, api.predict, True), methods=["POST"]),
        Route(f"{model}:explain", endpoint(api, api.explain, True), methods=["POST"]),
        Route(model, endpoint(api, api.model, False), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: refusal})
    return SecurityHeaders(app)
