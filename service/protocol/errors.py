"""Domain errors, and the one table from each of them to a gRPC status code name.

The engine raises these with a message a user can act on; the pipeline writes the code
name into a reply's ``Error`` (TorchServe cannot fail one item of a batch with a status),
the gateway's interceptor turns it into the call's status, and the client can rebuild
the class from the name. Standard library only.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error raised on purpose (INTERNAL when nothing more specific)."""


class InvalidInputError(EngineError):
    """The request is malformed: bad image, bad shape, bad parameter (INVALID_ARGUMENT)."""


class UnknownMethodError(InvalidInputError):
    """The requested explanation method is not in the registry (INVALID_ARGUMENT)."""


class TargetOutOfRangeError(InvalidInputError):
    """A target class index is outside ``[0, num_classes)`` (INVALID_ARGUMENT)."""


class UnsupportedMethodError(EngineError):
    """The method exists but this model cannot run it, e.g. CAM without a layer.

    Maps to FAILED_PRECONDITION.
    """


class ResourceLimitError(EngineError):
    """The request would exceed a configured limit: pixels, samples, batch (RESOURCE_EXHAUSTED)."""


class OverloadedError(ResourceLimitError):
    """The server is busy right now: the same request can succeed later (RESOURCE_EXHAUSTED).

    Unlike the other resource limits, retrying with backoff is the right answer: the
    message says so.
    """


class UnavailableError(EngineError):
    """The model server or its worker cannot answer now: down, restarting, or the worker
    died during the call (UNAVAILABLE; a retry can succeed)."""


class ModelNotFoundError(EngineError):
    """The model server does not serve the named model (NOT_FOUND)."""


class UnauthenticatedError(EngineError):
    """The call carries no valid credentials (UNAUTHENTICATED)."""


class CancelledError(EngineError):
    """The caller went away; the work it started stops (CANCELLED)."""


class DeadlineExceededError(EngineError):
    """The request's deadline passed before the work finished (DEADLINE_EXCEEDED)."""


# Most specific first: the first class an exception is an instance of gives its code.
_CODES: tuple[tuple[type[EngineError], str], ...] = (
    (InvalidInputError, "INVALID_ARGUMENT"),
    (OverloadedError, "RESOURCE_EXHAUSTED"),
    (ResourceLimitError, "RESOURCE_EXHAUSTED"),
    (UnavailableError, "UNAVAILABLE"),
    (ModelNotFoundError, "NOT_FOUND"),
    (UnauthenticatedError, "UNAUTHENTICATED"),
    (DeadlineExceededError, "DEADLINE_EXCEEDED"),
    (CancelledError, "CANCELLED"),
    (UnsupportedMethodError, "FAILED_PRECONDITION"),
    (EngineError, "INTERNAL"),
)
# A code name back to its class: the least specific class of that code (the last listed),
# since a status carries no more than its code.
_BY_CODE: dict[str, type[EngineError]] = {code: cls for cls, code in _CODES}
RETRYABLE: tuple[type[EngineError], ...] = (OverloadedError, UnavailableError)
"""Errors after which the same request can succeed (with backoff for an overload)."""
MAX_MESSAGE_CHARS = 1000
"""Longest error message sent to a client; a status must stay small whatever the input."""
ECHO_CHARS = 100
"""Most characters of one user-supplied value that a message repeats (see :func:`clip`)."""
INTERNAL_MESSAGE = "internal error in the model worker (see its log)"
"""What a client is told of an error that is not a domain error: a bug's or a library's
message may hold internals (paths, class names, values), so it goes to the log only."""


def code_name(exc: BaseException) -> str:
    """gRPC status code name (``"INVALID_ARGUMENT"``...) of an exception; else INTERNAL."""
    for cls, name in _CODES:
        if isinstance(exc, cls):
            return name
    return "INTERNAL"


def error_from_code(code: str, message: str) -> EngineError:
    """The domain error a code name stands for (the inverse of :func:`code_name`)."""
    return _BY_CODE.get(code, EngineError)(message)


def message_of(exc: BaseException) -> str:
    """What a client is told: the message, or the class name, at most ~1000 characters."""
    text = str(exc) or type(exc).__name__
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[:MAX_MESSAGE_CHARS] + f"... ({len(text)} characters)"


def public_message(exc: BaseException) -> str:
    """What a client may read about ``exc``: a domain error's message, else a fixed text."""
    return message_of(exc) if isinstance(exc, EngineError) else INTERNAL_MESSAGE


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: the one way a message echoes user input.

    Every message that repeats a request's value (a parameter, a name, a shape) passes it
    through here, so no input makes a status larger than a few hundred characters.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text)} characters)"


# The HTTP status of each gRPC code, for the gateway's HTTP/JSON front: google.rpc.Code's
# own mapping (its comments in code.proto), with CANCELLED as the 499 that proxies use.
# FAILED_PRECONDITION is 400, not 412: 412 answers HTTP's conditional headers (If-Match),
# while here the request asks for what this model cannot do (CAM without a layer). A body
# over the size limit is 413 (the HTTP front says so itself, before reading it): over
# gRPC the same refusal is RESOURCE_EXHAUSTED, which is 429 for every other limit.
HTTP_STATUSES: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
PAYLOAD_TOO_LARGE = 413
"""The HTTP status of a request body over the size limit (RESOURCE_EXHAUSTED in gRPC)."""


def http_status(code: str) -> int:
    """The HTTP status of a gRPC status code name; 500 for a name that is not one."""
    return HTTP_STATUSES.get(code, 500)
