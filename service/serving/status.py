"""The one table from domain errors to gRPC status code names.

The handler writes these names into ``Error.code`` (TorchServe cannot fail one item of a
batch with a status), and the gateway's interceptor turns them into the call's status.
"""

from __future__ import annotations

from service.engine.errors import (
    CancelledError,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    ResourceLimitError,
    UnsupportedMethodError,
)

_CODES: tuple[tuple[type[Exception], str], ...] = (
    (InvalidInputError, "INVALID_ARGUMENT"),
    (ResourceLimitError, "RESOURCE_EXHAUSTED"),
    (DeadlineExceededError, "DEADLINE_EXCEEDED"),
    (CancelledError, "CANCELLED"),
    (UnsupportedMethodError, "FAILED_PRECONDITION"),
    (EngineError, "INTERNAL"),
)

_BY_NAME: dict[str, type[EngineError]] = {
    "INVALID_ARGUMENT": InvalidInputError,
    "RESOURCE_EXHAUSTED": ResourceLimitError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
    "FAILED_PRECONDITION": UnsupportedMethodError,
}


def code_name(exc: BaseException) -> str:
    """gRPC status code name for an exception; anything unexpected is INTERNAL."""
    for cls, name in _CODES:
        if isinstance(exc, cls):
            return name
    return "INTERNAL"


def error_from_code(code: str, message: str) -> EngineError:
    """Rebuild a domain error from a code name (the inverse of ``code_name``)."""
    return _BY_NAME.get(code, EngineError)(message)
