"""Decode untrusted image bytes into a fully loaded RGB image, or say precisely why not.

Preference tables come from the internet: bytes may be cut short, not an image at all, or a tiny file that
declares a gigantic canvas (a decompression bomb). Each failure maps to one stable quarantine reason.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError

# Formats a preference table can reasonably hold. Restricting Image.open to these keeps exotic plugins
# (EPS runs Ghostscript, for one) away from untrusted bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is a quarantine code, ``detail`` says what went wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, *, max_image_pixels: int) -> Image.Image:
    """Fully decode ``data`` into an RGB image (transparency composited onto white).

    Raises ``BadImage`` with reason ``decompression_bomb`` (declared width*height above ``max_image_pixels``,
    checked from the header before any pixel memory is allocated), ``truncated_image`` (data ends early) or
    ``undecodable_image`` (anything else).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadImage("undecodable_image", f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise BadImage("undecodable_image", "empty image bytes")
    # Another library may have switched this process-wide flag on; a half-decoded image must never pass as good.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # PIL's own bomb guard warns between its limit and twice its limit; make that a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # parses the header only
            width, height = image.size
            if width * height > max_image_pixels:
                raise BadImage(
                    "decompression_bomb",
                    f"header declares {width}x{height} = {width * height} pixels, "
                    f"above max_image_pixels={max_image_pixels}",
                )
            image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage("decompression_bomb", str(err)) from err
    except UnidentifiedImageError as err:
        # PIL's message names an in-memory object address; say something stable instead.
        formats = "/".join(ALLOWED_FORMATS)
        raise BadImage("undecodable_image", f"not a readable {formats} image ({len(data)} bytes)") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad data
        reason = "truncated_image" if "truncated" in str(err).lower() else "undecodable_image"
        raise BadImage(reason, f"{type(err).__name__}: {err}") from err
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
