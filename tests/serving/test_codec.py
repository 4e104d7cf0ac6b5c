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


# --- orientation: what the model sees is what a viewer shows --------------------------

# Stored pixels -> the picture a viewer shows, per EXIF orientation (TIFF 6.0 / EXIF 2.3:
# where the stored 0th row and 0th column go), written with numpy, not Pillow.
SHOWN = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.flipud(np.rot90(a, -1)),
    8: lambda a: np.rot90(a, 1),
}


def with_orientation(array: np.ndarray, fmt: str, orientation: int) -> pb.Image:
    exif = Image.Exif()
    exif[codec.EXIF_ORIENTATION] = orientation
    extra: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    if fmt == "JPEG":
        extra["quality"] = 95
    return encoded(array, fmt, exif=exif.tobytes(), **extra)


@pytest.mark.parametrize("orientation", sorted(SHOWN))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_is_applied_before_anything_sees_the_pixels(
    fmt: str, orientation: int
) -> None:
    stored = np.random.default_rng(orientation).integers(0, 255, (20, 36, 3), dtype=np.uint8)
    pixels = codec.decode_image(with_orientation(stored, fmt, orientation), LIMITS)
    np.testing.assert_array_equal(pixels, SHOWN[orientation](stored))


def test_a_jpeg_stored_sideways_decodes_upright() -> None:
    """Finding 9: a phone's portrait photo (orientation 6) was explained sideways."""
    stored = np.random.default_rng(6).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    plain = codec.decode_image(encoded(stored, "JPEG", quality=95), LIMITS)
    tagged = codec.decode_image(with_orientation(stored, "JPEG", 6), LIMITS)
    assert tagged.shape == (40, 24, 3)
    # The same compressed pixels either way: the tag only turns them.
    np.testing.assert_array_equal(tagged, np.rot90(plain, -1))


def test_a_malformed_exif_block_leaves_the_image_as_stored() -> None:
    stored = np.random.default_rng(1).integers(0, 255, (10, 14, 3), dtype=np.uint8)
    image = encoded(stored, "PNG", exif=b"Exif\x00\x00MM\x00*garbage")
    np.testing.assert_array_equal(codec.decode_image(image, LIMITS), stored)


# --- messages: bounded, and nothing of the libraries' internals -----------------------


def test_a_huge_tensor_shape_is_echoed_short() -> None:
    image = pb.Image(tensor=pb.Tensor(shape=[7] * 100_000, dtype=pb.Tensor.DTYPE_UINT8))
    with pytest.raises(InvalidInputError) as refused:
        codec.decode_image(image, LIMITS)
    assert "tensor shape must be" in str(refused.value) and len(str(refused.value)) < 300


def test_a_corrupt_image_is_told_without_pillow_internals() -> None:
    data = encoded(np.zeros((64, 64, 3), np.uint8), "JPEG").encoded
    corrupt = data[:400] + b"\xff" * 16 + data[416:]  # Pillow: "broken data stream ..."
    with pytest.raises(InvalidInputError) as refused:
        codec.decode_image(pb.Image(encoded=corrupt), LIMITS)
    assert str(refused.value) == "image could not be decoded: it is truncated or corrupt"


def test_an_unknown_map_encoding_is_refused_not_sent_as_png() -> None:
    with pytest.raises(InvalidInputError, match="unknown map encoding 'png16'"):
        codec.encode_map(np.zeros((4, 4), np.float32), "png16")
