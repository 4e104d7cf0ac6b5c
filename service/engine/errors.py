"""The engine's errors: the protocol's domain errors, importable from the engine.

They live in :mod:`service.protocol.errors` (standard library only) next to the one table
that maps each class to a gRPC status code; engine modules import them from there. This
module keeps ``service.engine.errors.InvalidInputError`` and friends working for library
users of the engine.
"""

from service.protocol.errors import (
    CancelledError,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    ResourceLimitError,
    TargetOutOfRangeError,
    UnknownMethodError,
    UnsupportedMethodError,
)

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "EngineError",
    "InvalidInputError",
    "ResourceLimitError",
    "TargetOutOfRangeError",
    "UnknownMethodError",
    "UnsupportedMethodError",
]
