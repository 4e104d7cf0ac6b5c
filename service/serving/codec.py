"""Bytes in, bytes out: image decoding under limits, map and mask encoding.

Images are turned upright before anything else sees them: a camera stores a portrait
photo as landscape pixels with an EXIF orientation tag (6: rotate 90 degrees clockwise to
view), and a viewer -- browser, phone, OpenCV's ``imread`` -- shows it rotated. The model,
the maps, the masks and the boxes all live in that upright frame, the one the user sees.

The inverse of the encoding (for clients) is :mod:`service.client.decode`.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import InvalidInputError, ResourceLimitError, clip
from service.protocol.limits import Limits
from service.protocol.names import MAP_ENCODINGS, MASKS

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
EXIF_ORIENTATION = 0x0112


def decode_image(image: pb.Image, limits: Limits) -> np.ndarray:
    """Pixels of a request image as uint8 ``(H, W, 3)`` RGB, upright (EXIF orientation
    applied; a tensor has none).

    Raises:
        InvalidInputError: empty, not an image, unsupported format, truncated, bad tensor.
        ResourceLimitError: larger than ``limits`` allow (checked before decoding).
    """
    source = image.WhichOneof("source")
    if source == "tensor":
        return _decode_tensor(image.tensor, limits)
    if source is None or not image.encoded:
        raise InvalidInputError("image is empty: set image.encoded (PNG, JPEG or WebP bytes)")
    data = image.encoded
    if len(data) > limits.max_image_bytes:
        raise ResourceLimitError(
            f"image is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            _check_size(opened.width, opened.height, limits)
            if opened.format not in ACCEPTED_FORMATS:
                raise InvalidInputError(
                    f"image format {opened.format} is not accepted; send PNG, JPEG or WebP"
                )
            rgb = upright(opened).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL refuses from the header too, for sizes far above ours.
        raise ResourceLimitError(
            f"image exceeds the pixel limit of {limits.max_image_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        raise InvalidInputError("image bytes are not a PNG, JPEG or WebP image") from None
    except (InvalidInputError, ResourceLimitError, MemoryError):
        raise
    except Exception:
        # Whatever a plugin raises on hostile bytes (OSError, SyntaxError, struct.error,
        # zlib.error...) is the image's fault, and its text names Pillow's internals.
        raise InvalidInputError("image could not be decoded: it is truncated or corrupt") from None
    return np.asarray(rgb, dtype=np.uint8)


def upright(image: Image.Image) -> Image.Image:
    """``image`` as a viewer shows it: its EXIF orientation (2-8) applied, else as stored.

    A malformed EXIF block counts as no orientation, as viewers treat it: the pixels are
    still a valid image.
    """
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return image
    if orientation not in range(2, 9):
        return image
    return ImageOps.exif_transpose(image)


def _check_size(width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image has no pixels ({width}x{height})")
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise ResourceLimitError(
            f"image is {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_image_pixels} pixels and {limits.max_image_side} per side: downscale it"
        )


def _decode_tensor(tensor: pb.Tensor, limits: Limits) -> np.ndarray:
    shape = tuple(tensor.shape)
    if len(shape) != 3 or shape[0] != 3:
        raise InvalidInputError(f"tensor shape must be (3, height, width), got {clip(shape)}")
    _check_size(shape[2], shape[1], limits)
    dtypes: dict[int, np.dtype[Any]] = {
        pb.Tensor.DTYPE_FLOAT32: np.dtype("<f4"),
        pb.Tensor.DTYPE_UINT8: np.dtype(np.uint8),
    }
    if tensor.dtype not in dtypes:
        raise InvalidInputError("tensor dtype must be DTYPE_FLOAT32 or DTYPE_UINT8")
    dtype = dtypes[tensor.dtype]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInputError(
            f"tensor data is {len(tensor.data)} bytes; shape {shape} of {dtype} needs {expected}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape).transpose(1, 2, 0)
    if dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise InvalidInputError("float32 tensor values must be finite and within [0, 1]")
    return np.ascontiguousarray(np.round(array * 255.0).astype(np.uint8))


def to_model_input(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> float32 ``(3, height, width)`` in ``[0, 1]``."""
    if pixels.shape[:2] != (height, width):
        shrink = pixels.shape[0] > height or pixels.shape[1] > width
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        pixels = cv2.resize(pixels, (width, height), interpolation=interpolation)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / 255.0


def resize_map(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map to the client's image size."""
    if saliency.shape == (height, width):
        return saliency.astype(np.float32, copy=False)
    return cv2.resize(saliency.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


MAP_ENCODERS = ("png8", "float16")


def check_map_encoding(encoding: str) -> None:
    """``InvalidInputError`` unless :func:`encode_map` writes ``encoding``; planning runs it."""
    if encoding not in MAP_ENCODERS:
        raise InvalidInputError(
            f"unknown map encoding {clip(encoding)} (known: {', '.join(MAP_ENCODERS)})"
        )


def encode_map(saliency: np.ndarray, encoding: str = "png8") -> pb.SaliencyMap:
    """A float ``(H, W)`` map as 8-bit PNG with its range (``png8``) or raw ``float16``.

    Raises:
        InvalidInputError: any other encoding (never a silent PNG).
    """
    check_map_encoding(encoding)
    height, width = saliency.shape
    lo, hi = float(saliency.min()), float(saliency.max())
    if encoding == "float16":
        data = saliency.astype("<f2").tobytes()
    else:
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        quantised = np.round((saliency - lo) * scale).astype(np.uint8)
        data = _png(quantised, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    return pb.SaliencyMap(
        width=width,
        height=height,
        encoding=MAP_ENCODINGS.number(encoding),  # type: ignore[arg-type]
        data=data,
        value_min=lo,
        value_max=hi,
    )


def encode_mask(mask: np.ndarray, kind: str) -> pb.Mask:
    """A boolean ``(H, W)`` mask made by the mask ``kind``, as a 1-bit PNG."""
    height, width = mask.shape
    data = _png(mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_BILEVEL, 1])
    return pb.Mask(width=width, height=height, kind=MASKS.number(kind), png=data)  # type: ignore[arg-type]


def encode_rgb(image: np.ndarray) -> bytes:
    """A float ``(3, H, W)`` image in ``[0, 1]`` as an 8-bit RGB PNG."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
    return _png(np.ascontiguousarray(pixels[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 6])


def _png(array: np.ndarray, params: list[int]) -> bytes:
    ok, buffer = cv2.imencode(".png", array, params)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()
