"""Request limits: what a single call may cost, with defaults a demanding service would use."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


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

    max_image_bytes: int = 16 * 1024 * 1024
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
