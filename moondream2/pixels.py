"""Any image file's pixels as 8-bit RGB, the form every crop and every drawing starts from.

Without torch, so the dataset loaders can use it without loading the model package.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


# Integer modes wider than 8 bits, scaled by their range (a 16-bit scan does not turn white, and a
# mid-grey stays mid-grey whatever the image's brightest pixel).
_WIDE_INT_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency onto white, wide integers and floats scaled by their range."""
    if image.mode == "F":
        image = _float_to_gray(image)
    if image.mode in _WIDE_INT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        # Mode "I" also holds 8-bit data promoted by some decoders; only rescale wide values.
        max_value = _WIDE_INT_MODES[image.mode] if pixels.max(initial=0) > 255 else 255
        image = Image.fromarray(np.clip(pixels * 255.0 / max_value, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _float_to_gray(image: Image.Image) -> Image.Image:
    """Float images (scientific TIFFs) usually hold 0..1; PIL's own conversion would clip those to black.
    Values above 1 are taken as 0..255 levels; NaN is black."""
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
    return Image.fromarray(np.clip(pixels * scale, 0, 255).round().astype(np.uint8), "L")
