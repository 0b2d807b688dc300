import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data.images import BadImage, decode_image

LIMIT = 4096 * 4096


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise_image(width: int = 32, height: int = 24, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def grey_png(width: int, height: int, *, complete: bool = True) -> bytes:
    """A hand-made 8-bit greyscale PNG of zeros. complete=False writes the header and a cut-off IDAT only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    if complete:
        compressor = zlib.compressobj(9)
        idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:
        idat = zlib.compress(row)[:8]
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def reason_of(data, **kwargs) -> str:
    with pytest.raises(BadImage) as caught:
        decode_image(data, max_image_pixels=kwargs.get("max_image_pixels", LIMIT))
    return caught.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_good_images_decode_to_rgb_of_the_right_size(fmt):
    original = noise_image()
    decoded = decode_image(encode(original, fmt), max_image_pixels=LIMIT)
    assert decoded.mode == "RGB" and decoded.size == (32, 24)
    if fmt == "PNG":  # lossless: the very pixels come back
        assert np.array_equal(np.asarray(decoded), np.asarray(original))


def test_greyscale_and_transparency_become_rgb_on_white():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(decode_image(encode(transparent), max_image_pixels=LIMIT)).min() == 255
    grey = Image.new("L", (8, 8), 40)
    assert np.asarray(decode_image(encode(grey), max_image_pixels=LIMIT)).tolist() == [[[40, 40, 40]] * 8] * 8


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_image(fmt, keep):
    data = encode(noise_image(64, 64), fmt)
    assert reason_of(data[: int(len(data) * keep)]) == "truncated_image"


def test_jpeg_missing_only_its_last_bytes_is_truncated():
    data = encode(noise_image(64, 64), "JPEG")
    assert reason_of(data[:-2]) == "truncated_image"


def test_truncation_is_caught_even_if_another_library_allowed_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(noise_image(64, 64), "JPEG")
    assert reason_of(data[: len(data) // 2]) == "truncated_image"


@pytest.mark.parametrize("data", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, None, "a.png"])
def test_undecodable(data):
    assert reason_of(data) == "undecodable_image"


def test_undecodable_detail_is_stable():
    first = pytest.raises(BadImage, decode_image, b"garbage", max_image_pixels=LIMIT).value.detail
    second = pytest.raises(BadImage, decode_image, b"garbage", max_image_pixels=LIMIT).value.detail
    assert first == second  # no memory addresses: quarantine tables repeat run to run


def test_decompression_bomb_above_our_limit():
    bomb = grey_png(2000, 2000)  # a few KB that would decode to 4 megapixels
    assert len(bomb) < 20_000
    assert reason_of(bomb, max_image_pixels=1000 * 1000) == "decompression_bomb"
    assert decode_image(bomb, max_image_pixels=LIMIT).size == (2000, 2000)  # allowed under a higher limit


def test_bomb_is_judged_from_the_header_before_any_pixel_is_decoded():
    # The pixel data is cut off: decoding would report truncation, so "bomb" proves the header check ran first.
    header_only = grey_png(5000, 5000, complete=False)
    assert reason_of(header_only) == "decompression_bomb"
    assert reason_of(grey_png(50, 50, complete=False)) == "truncated_image"


def test_pil_own_bomb_guard_counts_as_bomb_too():
    # 100 Mpx is above PIL's MAX_IMAGE_PIXELS (about 89 Mpx): PIL warns even though our limit is higher.
    assert Image.MAX_IMAGE_PIXELS is not None and 10_000 * 10_000 > Image.MAX_IMAGE_PIXELS
    assert reason_of(grey_png(10_000, 10_000, complete=False), max_image_pixels=2**40) == "decompression_bomb"
    # Above twice PIL's limit, PIL raises its own error.
    assert reason_of(grey_png(30_000, 30_000, complete=False), max_image_pixels=2**40) == "decompression_bomb"
