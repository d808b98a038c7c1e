"""A deterministic toy detection dataset: coloured shapes on noisy grey backgrounds.

Each class has its own shape and colour, so a model can learn it in minutes on a CPU; that makes
it the dataset for end-to-end learning tests. Image i of a split depends only on
(seed, split, i), so the same arguments always give the same pixels and boxes.
"""

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from moondream2.errors import UserInputError

from .boxes import Box, canonical_order
from .splits import ROBOFLOW_JSON

SHAPE_COLOURS = {
    "circle": (225, 40, 40),
    "square": (40, 185, 60),
    "triangle": (45, 85, 230),
    "diamond": (240, 200, 20),
}
DEFAULT_CLASSES = ("circle", "square", "triangle")
_MIN_SIDE, _MAX_SIDE = 0.10, 0.40  # object side as a fraction of the image side
_PLACEMENT_TRIES = 20

PixelBox = tuple[int, int, int, int]  # x_min, y_min, x_max (exclusive), y_max (exclusive)


@dataclass(frozen=True)
class SyntheticImage:
    """A generated image and its boxes (normalized xyxy, canonical order) per class present."""

    image: Image.Image
    boxes_by_class: dict[str, list[Box]]


def make_synthetic_split(
    n_images: int,
    seed: int,
    image_size: int = 192,
    max_objects: int = 4,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    split: str = "train",
) -> list[SyntheticImage]:
    """Generate `n_images` square images in memory; different `split` names never share images."""
    result = []
    for objects, image in _generate(n_images, seed, image_size, max_objects, classes, split):
        by_class: dict[str, list[Box]] = {}
        for name, (x0, y0, x1, y1) in objects:
            by_class.setdefault(name, []).append((x0 / image_size, y0 / image_size, x1 / image_size, y1 / image_size))
        result.append(SyntheticImage(image, {k: list(canonical_order(v)) for k, v in by_class.items()}))
    return result


def write_synthetic_coco(
    out_dir: str | Path,
    n_train: int,
    n_valid: int,
    n_test: int,
    seed: int,
    image_size: int = 192,
    max_objects: int = 4,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> Path:
    """Write a Roboflow-layout COCO dataset (PNG images, placeholder category 0) that `load_split` reads.

    Splits with zero images are not written. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    categories = [{"id": 0, "name": "shapes", "supercategory": "none"}]
    categories += [{"id": i + 1, "name": name, "supercategory": "shapes"} for i, name in enumerate(classes)]
    category_id = {c["name"]: c["id"] for c in categories[1:]}
    for split, n_images in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        if n_images == 0:
            continue
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i, (objects, image) in enumerate(_generate(n_images, seed, image_size, max_objects, classes, split)):
            file_name = f"{split}_{i:05d}.png"
            image.save(split_dir / file_name)
            images.append({"id": i, "file_name": file_name, "width": image_size, "height": image_size})
            for name, (x0, y0, x1, y1) in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i, "category_id": category_id[name],
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                    "segmentation": [], "iscrowd": 0,
                })
        coco = {"info": {"description": f"synthetic shapes, seed {seed}"}, "categories": categories,
                "images": images, "annotations": annotations}
        (split_dir / ROBOFLOW_JSON).write_text(json.dumps(coco))
    return out_dir


def _generate(n_images: int, seed: int, image_size: int, max_objects: int, classes: tuple[str, ...], split: str):
    """Yield (objects, image) with objects as (class name, pixel box)."""
    unknown = [c for c in classes if c not in SHAPE_COLOURS]
    if unknown or not classes:
        raise UserInputError(f"classes: unknown or no shapes {unknown}; choose from {', '.join(SHAPE_COLOURS)}")
    if image_size < 32 or max_objects < 0:
        raise UserInputError(f"image_size must be >= 32 and max_objects >= 0, got {image_size} and {max_objects}")
    split_key = zlib.crc32(split.encode())
    for i in range(n_images):
        rng = np.random.default_rng([seed, split_key, i])
        image = _background(rng, image_size)
        objects = _place_objects(rng, image_size, max_objects, classes)
        draw = ImageDraw.Draw(image)
        for name, box in objects:
            colour = tuple(int(c) for c in np.clip(np.array(SHAPE_COLOURS[name]) + rng.integers(-20, 21, 3), 0, 255))
            _draw_shape(draw, name, box, colour)
        yield objects, image


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Grey with a gentle gradient and pixel noise: varied, yet never shape-coloured."""
    base = rng.uniform(70, 190)
    ramp = np.linspace(-1, 1, size)
    grey = base + ramp[None, :] * rng.uniform(-25, 25) + ramp[:, None] * rng.uniform(-25, 25)
    pixels = grey[:, :, None] + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _place_objects(
    rng: np.random.Generator, size: int, max_objects: int, classes: tuple[str, ...]
) -> list[tuple[str, PixelBox]]:
    """Up to `max_objects` non-overlapping boxes, each side 10-40% of the image side."""
    lo, hi = int(np.ceil(_MIN_SIDE * size)), int(_MAX_SIDE * size)
    placed: list[tuple[str, PixelBox]] = []
    for _ in range(rng.integers(0, max_objects + 1)):
        name = classes[rng.integers(len(classes))]
        for _ in range(_PLACEMENT_TRIES):
            w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
            if name in ("circle", "square"):
                h = w
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if not any(_overlaps(box, other) for _, other in placed):
                placed.append((name, box))
                break
    return placed


def _overlaps(a: PixelBox, b: PixelBox) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box: PixelBox, colour: tuple[int, ...]) -> None:
    """Draw so the shape's pixels span exactly `box` (max edges exclusive)."""
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if name == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif name == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif name == "triangle":
        draw.polygon([(x0, y1), (cx, y0), (x1, y1)], fill=colour)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
