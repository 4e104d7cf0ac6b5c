"""Domain errors of the engine.

The gateway maps each class to one gRPC status code in a single interceptor, and the
TorchServe handler carries the class name across the process boundary, so raise the most
specific class with a message a user can act on.
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


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


class CancelledError(EngineError):
    """The caller went away; the work it started stops (CANCELLED)."""


class DeadlineExceededError(EngineError):
    """The request's deadline passed before the work finished (DEADLINE_EXCEEDED)."""
