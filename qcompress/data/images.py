"""Image decoding shared by the dataset readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from qcompress.errors import QCompressError

_UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_image(path: Path) -> np.ndarray:
    """The image at ``path`` as uint8 RGB ``(H, W, 3)``.

    Pixels are returned as stored: EXIF orientation is not applied, because VOC and COCO boxes
    are annotated in stored-pixel coordinates. Raises :class:`QCompressError` naming the file when
    it is missing or cannot be decoded (truncated, not an image).
    """
    path = Path(path)
    if not path.is_file():
        raise QCompressError(f"image not found: {path}", "check the dataset folder is complete")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except _UNREADABLE as exc:
        raise QCompressError(
            f"cannot decode image {path}: {exc}", "re-download the file or remove it from the split"
        ) from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def read_image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise QCompressError(f"image not found: {path}", "check the dataset folder is complete")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except _UNREADABLE as exc:
        raise QCompressError(
            f"cannot read image header {path}: {exc}", "re-download the file or remove it from the split"
        ) from None
    return height, width
