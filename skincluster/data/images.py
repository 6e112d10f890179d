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
                rgb = to_rgb(img)
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), RESAMPLE)
    return np.asarray(rgb, dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB at 8 bits a channel. Pillow's own convert("RGB") clips 16-bit
    grayscale (a PNG's "I;16", or "I") at 255, which turns the image white;
    those are scaled down from their 16-bit range instead."""
    if img.mode.startswith("I"):
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{img.mode} pixel values outside 0-65535 are not a supported image")
        scaled = np.rint(values / 257.0).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")  # uint8, 2-D: mode "L"
    return img.convert("RGB")
