"""Crop tiling and stitching: the fact sheet's §3.1 table, odd sizes and modes, and the feature canvas."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from moondream2 import MoondreamConfig
from moondream2.image_crops import normalize_crops, overlap_crop_image, select_tiling
from moondream2.pixels import to_rgb
from moondream2.vision import stitch_local_features

from conftest import random_image

VISION = MoondreamConfig.preset("tiny").vision
CROP = VISION.crop_size  # 378
MARGIN_PX = VISION.overlap_margin * VISION.enc_patch_size  # 56
WINDOW = CROP - 2 * MARGIN_PX  # 266

# (height, width) -> (tiling, number of crops), from §3.1 of the fact sheet.
TABLE = [
    ((400, 400), (3, 3), 10),
    ((480, 640), (2, 4), 9),
    ((600, 800), (2, 4), 9),
    ((720, 1280), (2, 4), 9),
    ((1080, 1920), (2, 4), 9),
    ((3000, 4000), (2, 4), 9),
    ((800, 600), (4, 2), 9),
    ((768, 1024), (3, 4), 13),
    ((2000, 500), (6, 1), 7),
    ((200, 1000), (1, 1), 2),
    ((378, 378), (1, 1), 2),
    ((378, 2000), (1, 1), 2),
    ((3000, 378), (1, 1), 2),
    ((100, 100), (1, 1), 2),
]


def blank(height: int, width: int, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (width, height))


def check_crops(crops, tiling=None, n_crops=None):
    assert crops.crops.dtype == np.uint8
    assert crops.crops.ndim == 4 and crops.crops.shape[1:] == (CROP, CROP, 3)
    rows, cols = crops.tiling
    assert crops.crops.shape[0] == 1 + rows * cols
    assert crops.crops.shape[0] >= 2
    assert 1 <= rows * cols <= VISION.max_crops
    if tiling is not None:
        assert crops.tiling == tiling
    if n_crops is not None:
        assert crops.crops.shape[0] == n_crops


@pytest.mark.parametrize(("size", "tiling", "n_crops"), TABLE, ids=[f"{h}x{w}" for (h, w), _, _ in TABLE])
def test_fact_sheet_table(size, tiling, n_crops):
    height, width = size
    assert select_tiling(height - 2 * MARGIN_PX, width - 2 * MARGIN_PX, WINDOW, VISION.max_crops) == tiling
    check_crops(overlap_crop_image(blank(height, width), VISION), tiling, n_crops)


def test_select_tiling_rules():
    assert select_tiling(266, 10_000, 266, 12) == (1, 1)  # a side <= window
    assert select_tiling(10_000, 266, 266, 12) == (1, 1)
    assert select_tiling(267, 267, 266, 12) == (3, 3)  # the 2x2 minimum grows to fill the budget
    # Many windows needed: scaled down to the budget.
    rows, cols = select_tiling(3888, 5888, 266, 12)
    assert (rows, cols) == (2, 4)
    for h in range(270, 4000, 173):
        for w in range(270, 4000, 211):
            rows, cols = select_tiling(h, w, 266, 12)
            assert 1 <= rows * cols <= 12, (h, w, rows, cols)


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (5, 3000), (3000, 5), (4000, 6000)],
    ids=["1x1", "5x3000", "3000x5", "4000x6000"],
)
def test_odd_sizes(height, width, tiny_model):
    image = blank(height, width)
    crops = overlap_crop_image(image, VISION)
    check_crops(crops)
    if min(height, width) <= CROP:
        assert crops.tiling == (1, 1)
    encoded = tiny_model.encode_image(image)
    assert encoded.k[0].shape[2] == tiny_model.config.prefix_len
    assert all(torch.isfinite(k).all() for k in encoded.k + encoded.v)


def _sixteen_bit(height: int, width: int) -> Image.Image:
    ramp = np.linspace(0, 65535, width, dtype=np.float64)[None, :].repeat(height, axis=0)
    return Image.fromarray(ramp.astype(np.uint16))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK", "1"])
def test_image_modes(mode, tiny_model):
    if mode == "I;16":
        image = _sixteen_bit(300, 500)
    else:
        image = random_image(500, 300, seed=3, mode=mode)
    assert image.mode == mode
    crops = overlap_crop_image(image, VISION)
    check_crops(crops, (1, 1), 2)
    encoded = tiny_model.encode_image(image)
    assert all(torch.isfinite(k).all() for k in encoded.k)


def test_sixteen_bit_is_scaled_not_clipped():
    """A 16-bit ramp must keep its gradient: clipping to 8 bits would turn it almost all white."""
    crops = overlap_crop_image(_sixteen_bit(378, 378), VISION).crops[0]
    assert crops[..., 0].min() <= 5 and crops[..., 0].max() >= 250
    assert len(np.unique(crops[..., 0])) > 100
    # Grey stays grey.
    assert np.array_equal(crops[..., 0], crops[..., 1]) and np.array_equal(crops[..., 1], crops[..., 2])


def test_sixteen_bit_is_scaled_by_its_range_as_the_loader_does():
    """A flat 16-bit mid-grey is mid-grey to the model too (scaling by the brightest pixel would make it
    white), and the model and the dataset loader share one conversion."""
    from datasets.images import to_rgb as loader_to_rgb

    crops = overlap_crop_image(Image.new("I;16", (378, 378), 32896), VISION).crops
    assert np.all(np.abs(crops.astype(int) - 128) <= 1)
    assert loader_to_rgb is to_rgb


def test_transparent_pixels_do_not_leak_colour():
    """Fully transparent pixels carry arbitrary RGB; after conversion they must be one flat colour."""
    rgb = np.asarray(random_image(378, 378, seed=4))
    rgba = np.concatenate([rgb, np.zeros((378, 378, 1), dtype=np.uint8)], axis=-1)
    crops = overlap_crop_image(Image.fromarray(rgba, "RGBA"), VISION).crops
    assert len(np.unique(crops.reshape(-1, 3), axis=0)) == 1


def test_exif_rotated_jpeg(tmp_path):
    """Orientation 6 (rotate 90° clockwise to display): the displayed image is taller than wide.

    Applying the EXIF transpose is the dataset loader's job; here we only check that the rotated
    image, built explicitly, is tiled by its displayed size.
    """
    stored = random_image(800, 600, seed=6)  # W x H as stored: 800 x 600
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, format="JPEG", exif=exif.tobytes())

    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == 6
        assert raw.size == (800, 600)
        as_stored = overlap_crop_image(raw, VISION)
        rotated = ImageOps.exif_transpose(raw)
    assert rotated.size == (600, 800)
    check_crops(as_stored, (2, 4), 9)  # H 600 x W 800
    check_crops(overlap_crop_image(rotated, VISION), (4, 2), 9)  # H 800 x W 600


@pytest.mark.parametrize(("height", "width"), [(378, 378), (300, 300), (200, 1000), (1000, 100)])
def test_single_tile_local_crop_equals_global(height, width):
    crops = overlap_crop_image(random_image(width, height, seed=7), VISION)
    assert crops.tiling == (1, 1)
    assert np.array_equal(crops.crops[1], crops.crops[0])


def test_global_crop_is_whole_image_resized():
    """Left half black, right half white: the global crop shows the same split, unpadded."""
    pixels = np.zeros((600, 900, 3), dtype=np.uint8)
    pixels[:, 450:] = 255
    crops = overlap_crop_image(Image.fromarray(pixels), VISION)
    global_crop = crops.crops[0].astype(int)
    assert global_crop[:, :180].max() <= 10 and global_crop[:, 198:].min() >= 245
    # Local crops tile the image left to right: the first column is dark, the last is bright.
    rows, cols = crops.tiling
    assert crops.crops[1].mean() < 30 and crops.crops[cols].mean() > 225


def test_local_crops_overlap_by_two_margins():
    """Neighbouring local crops share 2 * margin pixels: the right strip of one is the left of the next."""
    crops = overlap_crop_image(random_image(800, 600, seed=8), VISION)
    rows, cols = crops.tiling
    assert (rows, cols) == (2, 4)
    tiles = crops.crops[1:].reshape(rows, cols, CROP, CROP, 3)
    overlap = 2 * MARGIN_PX
    for r in range(rows):
        for c in range(cols - 1):
            assert np.array_equal(tiles[r, c][:, WINDOW:], tiles[r, c + 1][:, :overlap])
    for r in range(rows - 1):
        assert np.array_equal(tiles[r, 0][WINDOW:], tiles[r + 1, 0][:overlap])


def test_normalize_crops_range_and_layout():
    crops = np.zeros((2, CROP, CROP, 3), dtype=np.uint8)
    crops[0, ..., 0] = 255
    crops[1, ..., 2] = 128
    pixels = normalize_crops(crops, "cpu", torch.float32)
    assert pixels.shape == (2, 3, CROP, CROP) and pixels.dtype == torch.float32
    assert torch.all(pixels[0, 0] == 1.0) and torch.all(pixels[0, 1:] == -1.0)
    assert torch.allclose(pixels[1, 2], torch.tensor(128 / 255 * 2 - 1), atol=4e-3)


# ---- stitching ---------------------------------------------------------------------------------


def _tile_grid(rows: int, cols: int, g: int) -> torch.Tensor:
    """(rows*cols, g, g, 3): channel 0 = tile index, 1 = row inside the tile, 2 = column inside."""
    local = torch.zeros(rows * cols, g, g, 3)
    local[..., 0] = torch.arange(rows * cols, dtype=torch.float32).view(-1, 1, 1)
    local[..., 1] = torch.arange(g, dtype=torch.float32).view(1, g, 1)
    local[..., 2] = torch.arange(g, dtype=torch.float32).view(1, 1, g)
    return local


@pytest.mark.parametrize("tiling", [(1, 1), (2, 3), (3, 1), (4, 2), (2, 4), (3, 4)])
def test_stitch_local_features(tiling):
    rows, cols = tiling
    g, m = VISION.grid_size, VISION.overlap_margin  # 27, 4
    step = g - 2 * m
    canvas = stitch_local_features(_tile_grid(rows, cols, g), tiling, m)
    assert canvas.shape == (rows * step + 2 * m, cols * step + 2 * m, 3)

    def tile_of(i: int, n: int) -> int:
        return min(max((i - m) // step, 0), n - 1)

    for y in range(canvas.shape[0]):
        r = tile_of(y, rows)
        for x in range(canvas.shape[1]):
            c = tile_of(x, cols)
            expected = (r * cols + c, y - r * step, x - c * step)
            assert tuple(canvas[y, x].tolist()) == expected, (y, x)
    # Interior tiles contribute only their centre [m, g - m).
    if rows > 2 and cols > 1:
        centre = canvas[step + m : 2 * step + m, m : step + m]
        assert torch.all(centre[..., 0] == cols)  # tile (1, 0)
        assert centre[..., 1].min() == m and centre[..., 1].max() == g - m - 1


def test_stitch_single_tile_is_identity():
    g, m = VISION.grid_size, VISION.overlap_margin
    local = torch.randn(1, g, g, 5)
    assert torch.equal(stitch_local_features(local, (1, 1), m), local[0])
