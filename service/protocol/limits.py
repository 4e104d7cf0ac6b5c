"""What a single call may cost, and the message sizes every host agrees on."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bounds checked before any expensive work starts.

    Attributes:
        max_image_bytes: encoded image size (the gateway's message limit is a bit above).
        max_image_pixels: width x height after reading the header and before decoding, so a
            decompression bomb is refused without allocating its pixels.
        max_image_side: longest side accepted.
        max_explanations: methods x targets in one request.
        max_top_k: predictions listed / targets explained by top-k.
    """

    max_image_bytes: int = 16 * MIB
    max_image_pixels: int = 2048 * 2048
    max_image_side: int = 8192
    max_explanations: int = 32
    max_top_k: int = 20

    @classmethod
    def from_env(cls, prefix: str = "SALIENCY_LIMIT_") -> Limits:
        """Defaults overridden by ``SALIENCY_LIMIT_MAX_IMAGE_PIXELS=...`` and friends."""
        values = {
            f.name: int(os.environ[prefix + f.name.upper()])
            for f in fields(cls)
            if prefix + f.name.upper() in os.environ
        }
        return cls(**values)


GATEWAY_RECEIVE_BYTES = Limits().max_image_bytes + MIB
"""Largest request the gateway accepts: the image limit plus room for the other fields."""

MAX_MESSAGE_BYTES = 64 * MIB
"""Largest message clients, gateway and TorchServe send or receive: far above any request
the gateway accepts, so that a reply (maps of a large image) is never what gets refused."""
