"""A deterministic synthetic detection world: shapes of many kinds and colours on varied backgrounds.

The class of an object is its shape (or, with `colour_named`, its colour and shape: "red circle");
colour is drawn independently of the class. Objects are 4% to 50% of the image's shorter side, 0 to
`max_objects` per image with several of one class, and may overlap, each staying at least
`1 - max_hidden` visible. Backgrounds are noise, colour gradients, low-contrast textures or clutter
(thin lines and specks that are no class). Images come in several sizes and aspect ratios, so
multi-crop tiling runs. Boxes are the exact pixel extent of each shape.

`PRETRAIN_WORLD` holds some shapes and colours back (`NEW_SHAPES`, `NEW_COLOURS`): the shipped base
model never saw them, so fine-tuning on them has something new to learn.

Image i of a split depends only on (seed, split, i, world), so the same arguments always give the
same pixels and boxes.
"""

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from finetune.files import atomic_write
from moondream2.errors import UserInputError

from .boxes import Box, canonical_order
from .splits import ROBOFLOW_JSON

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "orange": (245, 135, 20),
    "purple": (140, 50, 185),
    "cyan": (30, 200, 215),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring")
NEW_SHAPES = ("hexagon", "cross", "ring")
NEW_COLOURS = ("orange", "purple", "cyan")
BACKGROUNDS = ("noise", "gradient", "texture", "clutter")
_ROUND_SHAPES = ("circle", "square", "ring", "cross", "hexagon")  # drawn with equal width and height
_PLACEMENT_TRIES = 30
_MIN_CONTRAST = 90.0  # RGB distance between an object's colour and the background under it


@dataclass(frozen=True)
class ShapeWorld:
    """What a synthetic split may contain. Sizes are fractions of the image's shorter side."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: tuple[str, ...] = tuple(COLOURS)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    colour_named: bool = False  # classes are "red circle", ... instead of "circle"
    min_side: float = 0.04
    max_side: float = 0.5
    max_objects: int = 10
    max_hidden: float = 0.3  # at most this fraction of an object may be covered by later ones
    min_image_side: int = 128  # shorter side of the image, pixels
    max_image_side: int = 256
    aspect_ratios: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)
    image_size: int | None = None  # a fixed square size instead of the ranges above

    def __post_init__(self):
        unknown = [s for s in self.shapes if s not in SHAPES] + [c for c in self.colours if c not in COLOURS]
        unknown += [b for b in self.backgrounds if b not in BACKGROUNDS]
        if unknown or not self.shapes or not self.colours or not self.backgrounds:
            raise UserInputError(f"synthetic world: unknown or no shapes/colours/backgrounds {unknown}; shapes are "
                                 f"{', '.join(SHAPES)}, colours {', '.join(COLOURS)}, backgrounds {', '.join(BACKGROUNDS)}")
        if not 0 < self.min_side <= self.max_side <= 1 or self.max_objects < 0:
            raise UserInputError(f"synthetic world: need 0 < min_side <= max_side <= 1 and max_objects >= 0, got "
                                 f"{self.min_side}, {self.max_side}, {self.max_objects}")
        if (self.image_size or self.min_image_side) < 32 or self.min_image_side > self.max_image_side:
            raise UserInputError(f"synthetic world: image sides must be >= 32 px, got {self.image_size or self.min_image_side}")

    @property
    def class_names(self) -> list[str]:
        if self.colour_named:
            return [f"{colour} {shape}" for shape in self.shapes for colour in self.colours]
        return list(self.shapes)

    def with_(self, **changes) -> "ShapeWorld":
        return dataclasses.replace(self, **changes)


# What the shipped base learns from scratch in under an hour of CPU: the easier part of the world
# (plain and gradient backgrounds, up to 4 objects of 8-40% of the side). Textures, clutter, crowds,
# tiny objects, three shapes and three colours stay new for fine-tuning.
PRETRAIN_WORLD = ShapeWorld(
    shapes=tuple(s for s in SHAPES if s not in NEW_SHAPES),
    colours=tuple(c for c in COLOURS if c not in NEW_COLOURS),
    backgrounds=("noise", "gradient"),
    min_side=0.08,
    max_side=0.4,
    max_objects=4,
)
# The pretraining world's difficulty, with the three shapes (in any of the nine colours) the base
# never saw. Telling them apart is what the shipped base cannot yet learn from a few hundred images.
NEW_SHAPES_WORLD = PRETRAIN_WORLD.with_(shapes=NEW_SHAPES, colours=tuple(COLOURS))
# The quick start's task and the learning tests': one of those shapes alone (rings, any colour). The
# shipped base answers the new word with some of the objects; fine-tuning teaches it the rest.
RINGS_WORLD = NEW_SHAPES_WORLD.with_(shapes=("ring",))
# Classes told apart by colour alone ("red circle", "green circle", "blue circle"): a random-init
# model learns them in minutes, which a shape-only class is not (the learning tests, the GRPO benchmark).
COLOUR_CIRCLES_WORLD = ShapeWorld(shapes=("circle",), colours=("red", "green", "blue"), colour_named=True,
                                  backgrounds=("noise",), min_side=0.1, max_side=0.4, max_objects=3, image_size=160)


@dataclass(frozen=True)
class SyntheticImage:
    """A generated image and its boxes (normalized xyxy, canonical order) per class present."""

    image: Image.Image
    boxes_by_class: dict[str, list[Box]]


@dataclass(frozen=True)
class _Object:
    class_name: str
    box: tuple[int, int, int, int]  # pixel x_min, y_min, x_max, y_max (max exclusive)


def make_synthetic_split(n_images: int, seed: int, world: ShapeWorld | None = None, split: str = "train",
                         **world_fields) -> list[SyntheticImage]:
    """Generate `n_images` images in memory; different `split` names never share images.

    `world_fields` change single fields of `world` (default `ShapeWorld()`), e.g. `image_size=96`.
    """
    world = (world or ShapeWorld()).with_(**world_fields)
    result = []
    for objects, image in _generate(n_images, seed, world, split):
        w, h = image.size
        by_class: dict[str, list[Box]] = {}
        for o in objects:
            x0, y0, x1, y1 = o.box
            by_class.setdefault(o.class_name, []).append((x0 / w, y0 / h, x1 / w, y1 / h))
        result.append(SyntheticImage(image, {k: list(canonical_order(v)) for k, v in by_class.items()}))
    return result


def write_synthetic_coco(out_dir: str | Path, n_train: int, n_valid: int, n_test: int, seed: int,
                         world: ShapeWorld | None = None, **world_fields) -> Path:
    """Write a Roboflow-layout COCO dataset (PNG images, placeholder category 0) that `load_split` reads.

    Every class of the world is a category, present in the images or not. Splits with zero images
    are not written; each split's JSON is written last, so a split with its JSON is complete. Every
    file is written whole or not at all (`atomic_write`), so a crash never leaves a truncated JSON
    that would pass for a finished split.
    """
    world = (world or ShapeWorld()).with_(**world_fields)
    out_dir = Path(out_dir)
    categories = [{"id": 0, "name": "shapes", "supercategory": "none"}]
    categories += [{"id": i + 1, "name": name, "supercategory": "shapes"} for i, name in enumerate(world.class_names)]
    category_id = {c["name"]: c["id"] for c in categories[1:]}
    for split, n_images in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        if n_images == 0:
            continue
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i, (objects, image) in enumerate(_generate(n_images, seed, world, split)):
            file_name = f"{split}_{i:05d}.png"
            atomic_write(split_dir / file_name, lambda tmp: image.save(tmp, format="PNG"))
            images.append({"id": i, "file_name": file_name, "width": image.width, "height": image.height})
            for o in objects:
                x0, y0, x1, y1 = o.box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i, "category_id": category_id[o.class_name],
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                    "segmentation": [], "iscrowd": 0,
                })
        coco = {"info": {"description": f"synthetic shapes, seed {seed}", "world": dataclasses.asdict(world)},
                "categories": categories, "images": images, "annotations": annotations}
        text = json.dumps(coco)
        atomic_write(split_dir / ROBOFLOW_JSON, lambda tmp: Path(tmp).write_text(text))
    return out_dir


def _generate(n_images: int, seed: int, world: ShapeWorld, split: str):
    """Yield (objects, image) for images 0..n_images-1 of a split."""
    split_key = zlib.crc32(split.encode())
    for i in range(n_images):
        rng = np.random.default_rng([seed, split_key, i])
        width, height = _image_size(rng, world)
        pixels = _background(rng, world.backgrounds[rng.integers(len(world.backgrounds))], width, height)
        objects = _place_and_draw(rng, pixels, world)
        yield objects, Image.fromarray(pixels, "RGB")


def _image_size(rng: np.random.Generator, world: ShapeWorld) -> tuple[int, int]:
    if world.image_size:
        return world.image_size, world.image_size
    short = int(rng.integers(world.min_image_side, world.max_image_side + 1))
    aspect = world.aspect_ratios[rng.integers(len(world.aspect_ratios))]
    return (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))


# ---- backgrounds: muted, so every object colour can stand out somewhere ------------------------------
def _background(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "gradient":
        a, b = rng.uniform(50, 200, 3), rng.uniform(50, 200, 3)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        base = a + (b - a) * t[..., None]
    else:
        base = np.broadcast_to(rng.uniform(60, 190) + rng.uniform(-15, 15, 3), (height, width, 3)).copy()
    if kind == "texture":
        period = rng.uniform(4, 16)
        if rng.random() < 0.5:  # stripes at a random angle
            angle = rng.uniform(0, np.pi)
            wave = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
        else:  # checkerboard
            wave = np.sign(np.sin(np.pi * xx / period) * np.sin(np.pi * yy / period))
        base += rng.uniform(12, 30) * wave[..., None]
    pixels = base + rng.normal(0, rng.uniform(4, 14), (height, width, 3))
    out = np.clip(pixels, 0, 255).astype(np.uint8)
    if kind == "clutter":
        _draw_clutter(rng, out)
    return out


def _draw_clutter(rng: np.random.Generator, pixels: np.ndarray) -> None:
    """Thin lines and specks in any colour: edges and colour that belong to no class."""
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    h, w = pixels.shape[:2]
    for _ in range(rng.integers(5, 25)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        if rng.random() < 0.5:
            length, angle = rng.uniform(0.1, 0.5) * min(w, h), rng.uniform(0, 2 * np.pi)
            draw.line((x, y, x + length * np.cos(angle), y + length * np.sin(angle)), fill=colour, width=1)
        else:
            r = float(rng.uniform(0.5, 1.5))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    pixels[...] = np.asarray(image)


# ---- objects ----------------------------------------------------------------------------------------
def _place_and_draw(rng: np.random.Generator, pixels: np.ndarray, world: ShapeWorld) -> list[_Object]:
    """Place up to `max_objects` shapes, painting each onto `pixels`; returns them with tight boxes.

    A placement is kept only if no earlier object ends up more than `max_hidden` covered.
    """
    h, w = pixels.shape[:2]
    owner = np.full((h, w), -1, dtype=np.int32)  # which object each visible pixel shows
    areas: list[int] = []
    objects: list[_Object] = []
    shapes_so_far: list[str] = []
    for _ in range(rng.integers(0, world.max_objects + 1)):
        # Half the time repeat a shape already in the image: several objects of one class.
        repeat = shapes_so_far and rng.random() < 0.5
        shape = shapes_so_far[rng.integers(len(shapes_so_far))] if repeat else world.shapes[rng.integers(len(world.shapes))]
        for _ in range(_PLACEMENT_TRIES):
            mask, (x0, y0) = _random_mask(rng, shape, world, w, h)
            region = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            covered = np.bincount(region[mask & (region >= 0)], minlength=len(areas))
            visible = np.bincount(owner[owner >= 0], minlength=len(areas)) if areas else np.zeros(0, int)
            if areas and np.any(np.asarray(areas) - visible + covered > world.max_hidden * np.asarray(areas)):
                continue
            colour_name = _contrasting_colour(rng, world, pixels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask])
            if colour_name is None:
                continue
            colour = np.clip(np.array(COLOURS[colour_name]) + rng.integers(-15, 16, 3), 0, 255)
            pixels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = colour
            region[mask] = len(areas)
            areas.append(int(mask.sum()))
            ys, xs = np.nonzero(mask)
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            name = f"{colour_name} {shape}" if world.colour_named else shape
            objects.append(_Object(name, box))
            shapes_so_far.append(shape)
            break
    return objects


def _random_mask(rng: np.random.Generator, shape: str, world: ShapeWorld, width: int, height: int):
    """A boolean mask of the shape at a random size (log-uniform) and its top-left corner."""
    short = min(width, height)
    side = math.exp(rng.uniform(math.log(world.min_side), math.log(world.max_side))) * short
    stretch = 1.0 if shape in _ROUND_SHAPES else math.exp(rng.uniform(-0.3, 0.3))
    w = int(np.clip(round(side * stretch), 3, width))
    h = int(np.clip(round(side / stretch), 3, height))
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return _shape_mask(shape, w, h), (x0, y0)


def _contrasting_colour(rng: np.random.Generator, world: ShapeWorld, under: np.ndarray) -> str | None:
    """A random colour of the world that stands out from the pixels it will cover, or None."""
    mean = under.reshape(-1, 3).mean(axis=0) if under.size else np.zeros(3)
    choices = [c for c in world.colours if np.linalg.norm(np.array(COLOURS[c]) - mean) >= _MIN_CONTRAST]
    return choices[rng.integers(len(choices))] if choices else None


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """(h, w) boolean mask of the shape filling its box (it touches all four edges)."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = w - 1, h - 1
    if shape == "circle":
        draw.ellipse((0, 0, x1, y1), fill=1)
    elif shape == "ring":
        draw.ellipse((0, 0, x1, y1), fill=1)
        t = max(1.0, 0.22 * min(w, h))
        draw.ellipse((t, t, x1 - t, y1 - t), fill=0)
    elif shape == "square":
        draw.rectangle((0, 0, x1, y1), fill=1)
    elif shape == "cross":
        t = 0.34
        draw.rectangle((x1 * (0.5 - t / 2), 0, x1 * (0.5 + t / 2), y1), fill=1)
        draw.rectangle((0, y1 * (0.5 - t / 2), x1, y1 * (0.5 + t / 2)), fill=1)
    else:
        draw.polygon(_polygon(shape, x1, y1), fill=1)
    return np.asarray(canvas, dtype=bool)


def _polygon(shape: str, x1: float, y1: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape, scaled so they span (0, 0)-(x1, y1) exactly."""
    if shape == "triangle":
        unit = [(0.0, 1.0), (0.5, 0.0), (1.0, 1.0)]
    elif shape == "diamond":
        unit = [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    elif shape == "hexagon":
        unit = [(0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    elif shape == "star":
        unit = [(math.cos(a) * r, math.sin(a) * r)
                for k, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2) for r in [1.0 if k % 2 == 0 else 0.45]]
    else:
        raise UserInputError(f"unknown shape {shape!r}")
    xs, ys = [p[0] for p in unit], [p[1] for p in unit]
    sx, sy = x1 / (max(xs) - min(xs)), y1 / (max(ys) - min(ys))
    return [((x - min(xs)) * sx, (y - min(ys)) * sy) for x, y in unit]
