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
from .pixels import to_rgb


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
