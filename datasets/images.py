"""Read an image file into an upright 8-bit RGB PIL image, the only form the model sees.

Conventions:
- EXIF orientation is applied, so pixels match what an image viewer shows (and what
  annotation tools draw boxes on).
- Transparency (RGBA, LA, palette with transparency) is composited onto white: transparent
  regions look like paper, not like whatever colour happened to be stored under alpha 0.
- 16/32-bit integer images are scaled to 8 bits by their bit depth, not clipped, so a
  16-bit scan does not turn white.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from moondream2.errors import UserInputError

_WIDE_INT_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def load_image(path: str | Path) -> Image.Image:
    """Load `path` as an upright RGB image; the file is closed before returning."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: image file not found; check the path or remove it from the annotations")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserInputError(f"{path}: cannot read image ({e}); re-export or remove the file") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as `load_image` would return it, reading only the header."""
    path = Path(path)
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag
    # Orientations 5..8 rotate by 90 degrees, swapping the sides.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (transparency onto white, wide ints rescaled)."""
    if img.mode in _WIDE_INT_MODES:
        pixels = np.asarray(img, dtype=np.float64)
        # Mode "I" also holds 8-bit data promoted by some decoders; only rescale wide values.
        max_value = _WIDE_INT_MODES[img.mode] if pixels.max(initial=0) > 255 else 255
        img = Image.fromarray(np.clip(pixels * 255.0 / max_value, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()
