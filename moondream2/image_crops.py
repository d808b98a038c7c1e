"""Image preprocessing: one global crop plus overlapping local crops, as Moondream 2 tiles images.

Each local crop is `crop_size` pixels wide but only its centre window (the crop minus a margin of
`overlap_margin` patches on every side) is new content; neighbours overlap by twice the margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import VisionConfig


@dataclass
class ImageCrops:
    crops: np.ndarray  # (1 + rows * cols, crop_size, crop_size, 3) uint8, global crop first
    tiling: tuple[int, int]  # (rows, cols) of local crops


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """How many rows and columns of local crops cover an image (sizes already minus the margins)."""
    if height <= window or width <= window:
        return 1, 1
    min_h, min_w = math.ceil(height / window), math.ceil(width / window)
    if min_h * min_w > max_crops:
        ratio = math.sqrt(max_crops / (min_h * min_w))
        return max(1, math.floor(min_h * ratio)), max(1, math.floor(min_w * ratio))
    rows = max(math.floor(math.sqrt(max_crops * height / width)), min_h)
    cols = max(math.floor(math.sqrt(max_crops * width / height)), min_w)
    if rows * cols > max_crops:
        if cols > rows:
            cols = math.floor(max_crops / rows)
        else:
            rows = math.floor(max_crops / cols)
    return rows, cols


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


def _resize(image: Image.Image, width: int, height: int) -> np.ndarray:
    if image.size == (width, height):
        return np.asarray(image)
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS))


def overlap_crop_image(image: Image.Image, config: VisionConfig) -> ImageCrops:
    image = to_rgb(image)
    patch, crop = config.enc_patch_size, config.crop_size
    margin_px = config.overlap_margin * patch
    window = crop - 2 * margin_px
    width, height = image.size
    rows, cols = select_tiling(height - 2 * margin_px, width - 2 * margin_px, window, config.max_crops)

    crops = np.zeros((1 + rows * cols, crop, crop, 3), dtype=np.uint8)
    crops[0] = _resize(image, crop, crop)
    tiled = _resize(image, cols * window + 2 * margin_px, rows * window + 2 * margin_px)
    for r in range(rows):
        for c in range(cols):
            piece = tiled[r * window : r * window + crop, c * window : c * window + crop]
            crops[1 + r * cols + c, : piece.shape[0], : piece.shape[1]] = piece
    return ImageCrops(crops=crops, tiling=(rows, cols))


def normalize_crops(crops: np.ndarray, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, H, W) in [-1, 1].

    The arithmetic runs in bfloat16 because the released model was run (and trained) that way; a
    float32 normalisation would differ by up to ~4e-3 from what the original computes.
    """
    pixels = torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).to(torch.bfloat16)
    return ((pixels / 255.0 - 0.5) / 0.5).to(dtype)
