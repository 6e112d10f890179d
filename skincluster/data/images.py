"""Decode one image file into the store's 100x125 RGB uint8 array.

Ingest and `predict` both go through `decode_image`, so a model sees exactly
the pixels at prediction time that it was trained on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from skincluster.config import IMAGE_HEIGHT, IMAGE_WIDTH

#: The study's loader called ``Image.resize((125, 100))``; Pillow's default filter
#: for that is bicubic. We keep it, after draft decoding has done the heavy shrink.
RESAMPLE = Image.Resampling.BICUBIC


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read; the message says why."""


def decode_image(data: bytes, width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT) -> np.ndarray:
    """Return an (height, width, 3) uint8 RGB array from encoded image bytes.

    JPEGs are opened in draft mode: libjpeg decodes straight to the smallest
    power-of-two scale that is still at least (width, height), so a 600x450
    photo is decoded at 150x113 and never at full size (about 4x faster).
    Grayscale, CMYK, palette and PNG images are converted to RGB whatever
    their file name says.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # A truncated file must fail, not come back half grey.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (width, height))
                img.load()
                rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), RESAMPLE)
    return np.asarray(rgb, dtype=np.uint8)
