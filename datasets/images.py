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

from PIL import Image, ImageOps

from moondream2.errors import UserInputError
from moondream2.pixels import to_rgb


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
