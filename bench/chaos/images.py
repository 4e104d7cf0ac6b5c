"""Images a hostile client sends: valid, truncated, random, decompression bombs, tensors of
every wrong shape. Built from one seeded generator, so a run can be replayed."""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable, Sequence

from service._proto.saliency.v1 import saliency_pb2 as pb


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width x height`` grey pixels, with a few rows of data:
    a decoder that trusts the header allocates gigabytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", rows)
        + _chunk(b"IEND", b"")
    )


def _tensor(shape: Sequence[int], dtype: int, data: bytes) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(shape=list(shape), dtype=dtype, data=data))  # type: ignore[arg-type]


class Images:
    """Draws one image message at a time.

    Args:
        valid: encoded image files that a model can read (the cheap, common case).
        rng: the run's seeded generator.
    """

    def __init__(self, valid: Sequence[bytes], rng: random.Random) -> None:
        self.valid = list(valid)
        self.rng = rng
        self.kinds: list[tuple[float, Callable[[], pb.Image]]] = [
            (20, self._valid),
            (1, self._truncated),
            (1, self._random_bytes),
            (1, self._bomb),
            (0.5, self._empty),
            (2, self._valid_tensor),
            (2, self._bad_tensor),
        ]

    def draw(self) -> pb.Image:
        weights = [w for w, _ in self.kinds]
        return self.rng.choices([k for _, k in self.kinds], weights)[0]()

    def _valid(self) -> pb.Image:
        return pb.Image(encoded=self.rng.choice(self.valid))

    def _truncated(self) -> pb.Image:
        data = self.rng.choice(self.valid)
        return pb.Image(encoded=data[: self.rng.randrange(1, len(data))])

    def _random_bytes(self) -> pb.Image:
        return pb.Image(encoded=self.rng.randbytes(self.rng.randrange(0, 4096)))

    def _bomb(self) -> pb.Image:
        side = self.rng.choice([20_000, 50_000, 65_535, 1_000_000])
        return pb.Image(encoded=png_bomb(side, side))

    def _empty(self) -> pb.Image:
        return pb.Image()

    def _valid_tensor(self) -> pb.Image:
        side = self.rng.choice([8, 32, 64])
        if self.rng.random() < 0.5:
            return _tensor(
                (3, side, side), pb.Tensor.DTYPE_UINT8, self.rng.randbytes(3 * side * side)
            )
        values = [self.rng.random() for _ in range(3 * side * side)]
        return _tensor(
            (3, side, side), pb.Tensor.DTYPE_FLOAT32, struct.pack(f"<{len(values)}f", *values)
        )

    def _bad_tensor(self) -> pb.Image:
        nan = struct.pack("<f", float("nan"))
        choices: list[tuple[Sequence[int], int, bytes]] = [
            ((3, 0, 0), pb.Tensor.DTYPE_UINT8, b""),
            ((4, 8, 8), pb.Tensor.DTYPE_UINT8, bytes(256)),
            ((1, 8, 8), pb.Tensor.DTYPE_UINT8, bytes(64)),
            ((3, 8, 8), pb.Tensor.DTYPE_UINT8, bytes(100)),  # data of the wrong length
            ((3, 65_535, 65_535), pb.Tensor.DTYPE_UINT8, bytes(16)),
            ((3, 4_294_967_295, 2), pb.Tensor.DTYPE_UINT8, bytes(16)),
            ((8, 8), pb.Tensor.DTYPE_UINT8, bytes(64)),
            ((1, 3, 8, 8), pb.Tensor.DTYPE_UINT8, bytes(192)),
            ((3, 8, 8), 99, bytes(192)),  # an unknown dtype
            ((3, 8, 8), pb.Tensor.DTYPE_UNSPECIFIED, bytes(192)),
            ((3, 4, 4), pb.Tensor.DTYPE_FLOAT32, nan * 48),
            ((3, 4, 4), pb.Tensor.DTYPE_FLOAT32, struct.pack("<f", 1e30) * 48),
            ((), pb.Tensor.DTYPE_UINT8, b""),
        ]
        return _tensor(*self.rng.choice(choices))
