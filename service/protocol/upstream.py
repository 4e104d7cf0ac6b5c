"""Every failure TorchServe 0.12's gRPC inference API can answer with, and what it means here.

TorchServe answers a failed ``Predictions`` / ``StreamPredictions`` call with a status whose
code is rarely the right one for our client (a full queue and a missing model parameter
are both INTERNAL; a worker killed by the kernel is RESOURCE_EXHAUSTED while one that
crashed is INTERNAL) and whose description ends in a Java class name. This table, read
from the 0.12.0 frontend (``frontend/server/src/main/java/org/pytorch/serve/``) and Python
backend (``ts/``), turns each into one domain error of :mod:`service.protocol.errors`
with a message a user can act on. Standard library only.

Where each text comes from:

* ``grpcimpl/InferenceImpl.prediction``: "Parameter model_name is required." (INTERNAL);
  ``ModelNotFoundException`` "Model not found: X" and ``ModelVersionNotFoundException``
  "Model version: V does not exist for model: X" (INTERNAL); ``ModelManager.addJob``
  refused -- the model's job queue (``job_queue_size``) is full, or no worker thread is
  registered -- "Model \\"X\\" has no worker to serve inference request. Please use scale
  workers API ..." (INTERNAL); the on-cancel handler's "call already cancelled" (CANCELLED).
* ``grpcimpl/GRPCInterceptor``: "Token Authorization failed. ..." (PERMISSION_DENIED).
* ``wlm/WorkerThread.run``'s ``finally``: "Worker died." for every job of the batch a worker
  was running when its process exited or missed ``responseTimeout``; HTTP 500 (INTERNAL),
  or 413 (RESOURCE_EXHAUSTED) when the exit code was 137 (SIGKILL, e.g. the OOM killer).
* ``ts/service.py`` ``Service.predict`` when the handler fails a whole batch: "Out of
  resources" (507: INTERNAL), "Prediction failed", "Invalid model predict output",
  "number of batch response mismatched" (503: UNAVAILABLE).
* The transport: UNAVAILABLE (the frontend is down), DEADLINE_EXCEEDED, CANCELLED, and
  grpc-java's RESOURCE_EXHAUSTED for a message above ``max_request_size``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.protocol.errors import (
    CancelledError,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    ResourceLimitError,
    UnavailableError,
)

RETRY_HINT = "retry with backoff"


@dataclass(frozen=True)
class Failure:
    """One kind of TorchServe failure.

    Attributes:
        codes: the gRPC code names TorchServe sends it with (empty: any).
        text: a regular expression its description matches (``""``: any).
        error: the domain error it becomes.
        message: what the client is told; ``{model}`` is the served model's name.
    """

    codes: tuple[str, ...]
    text: str
    error: type[EngineError]
    message: str

    def matches(self, code: str, details: str) -> bool:
        return (not self.codes or code in self.codes) and re.search(self.text, details) is not None


FAILURES: tuple[Failure, ...] = (
    # Texts first: they say more than the codes TorchServe picks.
    Failure(
        (),
        r"^Worker died",
        UnavailableError,
        "the model worker serving {model} stopped during the call (it restarts by itself); "
        + RETRY_HINT,
    ),
    Failure(
        (),
        r"has no worker to serve inference request",
        OverloadedError,
        "server busy: the model server's queue for model {model} is full; " + RETRY_HINT,
    ),
    Failure(
        (),
        r"^Out of resources",
        OverloadedError,
        "server busy: the model worker ran out of memory on this batch; " + RETRY_HINT,
    ),
    Failure(
        (),
        r"^(Prediction failed|Invalid model predict output|number of batch response mismatch)",
        UnavailableError,
        "the model worker for {model} failed a batch as a whole; " + RETRY_HINT,
    ),
    Failure(
        (),
        r"^Model (not found|version)",
        ModelNotFoundError,
        "model {model} is not loaded in the model server",
    ),
    Failure((), r"^Parameter model_name is required", InvalidInputError, "no model name was given"),
    Failure(
        ("PERMISSION_DENIED", "UNAUTHENTICATED"),
        "",
        UnavailableError,
        "the model server refused the gateway's key (a configuration fault, reported in the "
        "gateway's log)",
    ),
    Failure(
        ("RESOURCE_EXHAUSTED",),
        "",
        ResourceLimitError,
        "the request is larger than the model server accepts",
    ),
    Failure(
        ("UNAVAILABLE",),
        "",
        UnavailableError,
        "the model server is not answering (starting, restarting or down); " + RETRY_HINT,
    ),
    Failure(
        ("DEADLINE_EXCEEDED",),
        "",
        DeadlineExceededError,
        "deadline exceeded waiting for the model server",
    ),
    Failure(("CANCELLED",), "", CancelledError, "call cancelled"),
)

_CLASS_NAME = re.compile(r"\b(?:[a-z_][a-z0-9_]*\.)+[A-Z]\w*(?:\.\(\))?")


def sanitized(details: str, limit: int = 200) -> str:
    """The first line of a description, without Java/Python class names, at most ``limit``."""
    first = (details or "").strip().splitlines()[0] if (details or "").strip() else ""
    text = _CLASS_NAME.sub("", first).strip(" :") or "no description"
    return text if len(text) <= limit else text[:limit] + "..."


def from_torchserve(code: str, details: str, model: str) -> EngineError:
    """The domain error a failed TorchServe call stands for.

    Args:
        code: the call's gRPC status code name (``"INTERNAL"``...).
        details: its description, as TorchServe wrote it.
        model: the served model's name (the client's, not TorchServe's internal one).
    """
    for failure in FAILURES:
        if failure.matches(code, details):
            return failure.error(failure.message.format(model=model))
    # Not a failure TorchServe 0.12 sends: say what came back, without its internals.
    return EngineError(f"model server error ({code}): {sanitized(details)}")
