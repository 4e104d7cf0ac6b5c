"""What a single call may cost, and the message sizes every host agrees on."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

MIB = 1024 * 1024
ENV_PREFIX = "SALIENCY_LIMIT_"


@dataclass(frozen=True)
class Limits:
    """Bounds checked before any expensive work starts.

    Every field can be set in the worker's environment (:meth:`from_env`), e.g.
    ``SALIENCY_LIMIT_MAX_FORWARDS=200000``.

    Attributes:
        max_image_bytes: encoded image size (the gateway's message limit is a bit above).
        max_image_pixels: width x height after reading the header and before decoding, so a
            decompression bomb is refused without allocating its pixels.
        max_image_side: longest side accepted.
        max_explanations: methods x targets in one request.
        max_top_k: predictions listed / targets explained by top-k.
        max_forwards: forward-only rows of one request's explanations and scores (see
            :class:`~service.protocol.cost.Cost`). 65,536 admits every method's defaults
            many times over and the exhaustive settings people use (RISE with 8,192
            masks, occlusion at stride 1 on 224 px, Sobol with 512 designs on Fel et al.'s
            11x11 grid), and refuses what would hold a worker for many minutes.
        max_backward_rows: gradient rows (forward + backward) of one request: Integrated
            Gradients at its 1,024-step maximum for several targets, SmoothGrad with
            hundreds of samples for several targets.
        max_memory_bytes: the largest parameter-shaped buffers one request may hold at
            once (noise, masks, designs): 512 MiB, so two workers of a 4 GiB pod stay
            far from its limit whatever their requests ask.
        default_deadline_s: the deadline of a request that comes without one. A request
            never runs unbounded: TorchServe kills a worker whose batch outlives
            ``responseTimeout`` (120 s), losing every request in it, while a request
            stopped at its deadline costs only itself. 30 s is far above any default
            explanation and leaves a clear DEADLINE_EXCEEDED to a caller that needs more
            (it can send a deadline, up to the handler's cap below ``responseTimeout``).
    """

    max_image_bytes: int = 16 * MIB
    max_image_pixels: int = 2048 * 2048
    max_image_side: int = 8192
    max_explanations: int = 32
    max_top_k: int = 20
    max_forwards: int = 65_536
    max_backward_rows: int = 8_192
    max_memory_bytes: int = 512 * MIB
    default_deadline_s: float = 30.0

    @classmethod
    def variable(cls, field: str) -> str:
        """``max_forwards`` -> ``SALIENCY_LIMIT_MAX_FORWARDS``, the variable that sets a field."""
        return ENV_PREFIX + field.upper()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Limits:
        """Defaults overridden by ``SALIENCY_LIMIT_MAX_IMAGE_PIXELS=...`` and friends.

        Raises:
            ValueError: a value that is not a positive number of the field's type; the
                worker then fails to start with that message rather than serve unbounded.
        """
        environ = dict(os.environ) if environ is None else environ
        values: dict[str, int | float] = {}
        for f in fields(cls):
            raw = environ.get(cls.variable(f.name))
            if raw is None:
                continue
            kind = float if isinstance(f.default, float) else int
            try:
                value = kind(raw)
            except ValueError:
                value = -1
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{cls.variable(f.name)} must be a positive {kind.__name__}")
            values[f.name] = value
        return cls(**values)  # type: ignore[arg-type]


GATEWAY_RECEIVE_BYTES = Limits().max_image_bytes + MIB
"""Largest request the gateway accepts: the image limit plus room for the other fields."""

MAX_MESSAGE_BYTES = 64 * MIB
"""Largest message clients, gateway and TorchServe send or receive: far above any request
the gateway accepts, so that a reply (maps of a large image) is never what gets refused."""
