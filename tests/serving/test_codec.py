"""Image decoding under limits, and the wire encodings of maps and masks."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.decode import decode_map, decode_mask
from service.protocol.errors import InvalidInputError, ResourceLimitError
from service.protocol.limits import Limits
from service.serving import codec

LIMITS = Limits()


def encoded(array: np.ndarray, fmt: str, **kwargs: object) -> pb.Image:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return pb.Image(encoded=buffer.getvalue())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    pixels = codec.decode_image(
        encoded(array, fmt, **({"lossless": True} if fmt == "WEBP" else {})), LIMITS
    )
    assert pixels.shape == (20, 30, 3) and pixels.dtype == np.uint8
    if fmt != "JPEG":
        np.testing.assert_array_equal(pixels, array)


def test_grayscale_and_alpha_become_rgb() -> None:
    gray = codec.decode_image(encoded(np.full((5, 6), 7, np.uint8), "PNG"), LIMITS)
    rgba = codec.decode_image(encoded(np.full((5, 6, 4), 9, np.uint8), "PNG"), LIMITS)
    assert gray.shape == rgba.shape == (5, 6, 3)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (pb.Image(), "empty"),
        (pb.Image(encoded=b""), "empty"),
        (pb.Image(encoded=b"this is not an image at all"), "not a PNG"),
    ],
)
def test_bad_bytes_are_invalid_argument(image: pb.Image, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        codec.decode_image(image, LIMITS)


def test_truncated_png_is_invalid_argument() -> None:
    data = encoded(np.zeros((64, 64, 3), np.uint8), "PNG").encoded
    with pytest.raises(InvalidInputError, match="decoded"):
        codec.decode_image(pb.Image(encoded=data[: len(data) // 2]), LIMITS)


def test_unaccepted_format_is_named() -> None:
    with pytest.raises(InvalidInputError, match="GIF"):
        codec.decode_image(encoded(np.zeros((4, 4), np.uint8), "GIF"), LIMITS)


@pytest.mark.parametrize("side", [30000, 5000])
def test_decompression_bomb_is_refused_before_decoding(
    side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 30000 x 30000 black PNG: ~1 MB on the wire, 2.7 GB once decoded (PIL itself refuses
    # it from the header); 5000 x 5000 is under PIL's limit and over ours.
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    bomb = buffer.getvalue()
    assert len(bomb) < 2_000_000
    assert side * side > LIMITS.max_image_pixels
    # Refused from the header: PIL's pixel decoder (ImageFile.load) never runs.
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda image: loads.append(image) or real_load(image)
    )
    with pytest.raises(ResourceLimitError, match="pixel"):
        codec.decode_image(pb.Image(encoded=bomb), LIMITS)
    assert loads == []


def test_oversized_bytes_are_resource_exhausted() -> None:
    with pytest.raises(ResourceLimitError, match="bytes"):
        codec.decode_image(pb.Image(encoded=b"\0" * 2048), Limits(max_image_bytes=1024))


def tensor(array: np.ndarray, dtype: int) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(shape=list(array.shape), dtype=dtype, data=array.tobytes()))


def test_tensors_decode() -> None:
    rng = np.random.default_rng(1)
    floats = rng.random((3, 8, 9), dtype=np.float32)
    pixels = codec.decode_image(tensor(floats, pb.Tensor.DTYPE_FLOAT32), LIMITS)
    np.testing.assert_allclose(pixels / 255.0, floats.transpose(1, 2, 0), atol=0.5 / 255 + 1e-6)
    ints = rng.integers(0, 255, (3, 4, 5), dtype=np.uint8)
    np.testing.assert_array_equal(
        codec.decode_image(tensor(ints, pb.Tensor.DTYPE_UINT8), LIMITS), ints.transpose(1, 2, 0)
    )


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (tensor(np.zeros((1, 4, 4), np.float32), pb.Tensor.DTYPE_FLOAT32), "shape"),
        (tensor(np.full((3, 4, 4), 2.0, np.float32), pb.Tensor.DTYPE_FLOAT32), r"\[0, 1\]"),
        (tensor(np.full((3, 4, 4), np.nan, np.float32), pb.Tensor.DTYPE_FLOAT32), "finite"),
        (
            pb.Image(tensor=pb.Tensor(shape=[3, 4, 4], dtype=pb.Tensor.DTYPE_FLOAT32, data=b"x")),
            "needs",
        ),
        (tensor(np.zeros((3, 4, 4), np.float32), pb.Tensor.DTYPE_UNSPECIFIED), "dtype"),
    ],
)
def test_bad_tensors_are_invalid_argument(image: pb.Image, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        codec.decode_image(image, LIMITS)


def test_png8_map_round_trips_within_one_level() -> None:
    rng = np.random.default_rng(2)
    saliency = rng.normal(size=(40, 50)).astype(np.float32)
    encoded_map = codec.encode_map(saliency, "png8")
    assert encoded_map.encoding == pb.MAP_ENCODING_PNG8
    span = saliency.max() - saliency.min()
    np.testing.assert_allclose(decode_map(encoded_map), saliency, atol=span / 255 / 2 + 1e-5)


def test_float16_map_round_trips() -> None:
    saliency = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    encoded_map = codec.encode_map(saliency, "float16")
    assert len(encoded_map.data) == 12 * 2
    np.testing.assert_allclose(decode_map(encoded_map), saliency, rtol=1e-3)


def test_constant_map_encodes() -> None:
    encoded_map = codec.encode_map(np.full((4, 4), 0.5, np.float32), "png8")
    np.testing.assert_allclose(decode_map(encoded_map), 0.5)


def test_mask_is_one_bit_png_and_round_trips() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((33, 47)) > 0.7
    encoded_mask = codec.encode_mask(mask, "threshold")
    assert Image.open(io.BytesIO(encoded_mask.png)).mode == "1"
    np.testing.assert_array_equal(decode_mask(encoded_mask), mask)


def test_224_map_and_mask_fit_in_80_kb_even_for_noise() -> None:
    # Worst case for PNG: an incompressible (uniform noise) map and a noisy mask.
    rng = np.random.default_rng(4)
    saliency = rng.random((224, 224)).astype(np.float32)
    size = len(codec.encode_map(saliency, "png8").data)
    size += len(codec.encode_mask(saliency > 0.95, "threshold").png)
    assert size <= 80_000


def test_image_just_over_our_limit_names_its_size() -> None:
    limits = Limits(max_image_pixels=100 * 100)
    with pytest.raises(ResourceLimitError, match="101x100"):
        codec.decode_image(encoded(np.zeros((100, 101, 3), np.uint8), "PNG"), limits)
