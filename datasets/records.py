"""The one in-memory form of a detection split, and the one way any annotation format becomes it.

Every format reader (COCO, YOLO, Pascal VOC, CSV, JSONL, parquet) only parses its files into
`Annotations`: images with their boxes as (class key, x1, y1, x2, y2), in pixels or normalised. What
follows is shared, so every format behaves alike:
- Class names come from the format's classes; a class no box uses is skipped (this drops Roboflow's
  placeholder category); `rename` maps original names to new ones and `classes` keeps only those
  (new) names. Classes renamed to the same name are merged.
- Image paths must stay inside the dataset directory: no absolute paths, no `..` escapes.
- Image width/height come from the image file; a size the annotations state that disagrees is
  counted in one warning. Missing or unreadable images stop the load (or are skipped when asked).
- Boxes are clipped to the image and normalised to 0..1; boxes left with zero area are dropped with
  one warning that counts them.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from moondream2.errors import UserInputError

from .boxes import Box, canonical_order, to_normalized
from .images import image_size, load_image

_SKIP_HINT = "pass skip_bad_images=True / --skip_bad_images=True to skip them"


@dataclass(frozen=True)
class DetectionSample:
    """One (image, class) pair with all boxes of that class; empty boxes = a negative."""

    image_path: Path
    image_id: int | str
    class_name: str
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class ImageRecord:
    """An image and its boxes (normalized xyxy, canonical order) for each class present."""

    path: Path
    width: int
    height: int
    image_id: int | str
    boxes_by_class: dict[str, list[Box]]


@dataclass
class DetectionSplit:
    """All images of one split, with the class names a sample may ask for."""

    images: list[ImageRecord]
    class_names: list[str]
    source: Path
    format: str = "coco"

    def samples(self, negatives_per_positive: float = 0.0, seed: int = 0) -> list[DetectionSample]:
        """Positives for every (image, class) with boxes, plus sampled negatives.

        Negatives teach the model to answer "nothing" for absent classes; their number is
        round(negatives_per_positive * #positives), capped by how many exist, chosen by `seed`.
        Call with a new seed per epoch to see different negatives. Sorted by image, then class.
        """
        if not (math.isfinite(negatives_per_positive) and negatives_per_positive >= 0):
            raise UserInputError(f"negatives_per_positive: must be a number >= 0, got {negatives_per_positive}")
        positives, negatives = [], []
        for i, image in enumerate(self.images):
            for c, name in enumerate(self.class_names):
                (positives if image.boxes_by_class.get(name) else negatives).append((i, c))
        n_negatives = min(len(negatives), round(negatives_per_positive * len(positives)))
        chosen = random.Random(seed).sample(negatives, n_negatives)
        return [self._sample(i, c) for i, c in sorted(positives + chosen)]

    def _sample(self, image_index: int, class_index: int) -> DetectionSample:
        image, name = self.images[image_index], self.class_names[class_index]
        boxes = tuple(image.boxes_by_class.get(name, ()))
        return DetectionSample(image.path, image.image_id, name, boxes)


@dataclass
class ImageEntry:
    """One image as the annotations list it, before its file is opened.

    `boxes` are (class key, (x1, y1, x2, y2)) in the units of the `Annotations` holding it; an
    image without boxes is a negative for every class.
    """

    image_id: int | str
    file_name: str  # as the annotations write it, for messages
    path: Path
    boxes: list[tuple[Any, tuple[float, float, float, float]]] = field(default_factory=list)
    stated_size: tuple[Any, Any] | None = None


@dataclass
class Annotations:
    """A split as a format reader parsed it: what `build_split` turns into a `DetectionSplit`."""

    source: Path  # the file (or folder) errors and warnings name
    format: str
    categories: dict[Any, str]  # class key -> class name, in the format's class order
    images: list[ImageEntry]
    normalized: bool = False  # boxes are fractions of the image size instead of pixels
    key_label: str = "category id"  # what the format calls a class key, for messages


def build_split(annotations: Annotations, classes: list[str] | None = None, rename: dict[str, str] | None = None,
                skip_bad_images: bool = False) -> DetectionSplit:
    """The split the trainers use, from any format's parsed annotations."""
    source = annotations.source
    if not annotations.images:
        raise UserInputError(f"{source}: the split has no images; add images or pick another split")
    class_of = _class_names(annotations, classes, rename or {})
    sizes = _image_sizes(annotations.images, source, skip_bad_images)
    if not any(sizes):
        raise UserInputError(f"{source}: no usable images left after skipping bad ones; fix the image files")
    records, n_dropped = [], 0
    for entry, size in zip(annotations.images, sizes):
        if size is None:
            continue
        width, height = size
        scale = (1.0, 1.0) if annotations.normalized else (width, height)
        by_class: dict[str, list[Box]] = {}
        for key, xyxy in entry.boxes:
            name = class_of.get(key)
            if name is None:
                continue
            box = to_normalized(xyxy, *scale)
            if box is None:
                n_dropped += 1
            else:
                by_class.setdefault(name, []).append(box)
        ordered = {name: list(canonical_order(boxes)) for name, boxes in by_class.items()}
        records.append(ImageRecord(entry.path, width, height, entry.image_id, ordered))
    if n_dropped:
        warnings.warn(f"{source}: dropped {n_dropped} box(es) with zero area or outside the image", stacklevel=3)
    return DetectionSplit(records, list(dict.fromkeys(class_of.values())), source, annotations.format)


def inside_path(source: Path, root: Path, directory: Path, file_name: Any, origin: str) -> Path:
    """`directory/file_name`, refusing names that leave the dataset directory `root` (absolute, `..`
    escapes, empty): a dataset must not read files elsewhere. `origin` says which entry names the
    file (e.g. "image id 3", "line 5"), so the message points at it."""
    relative = isinstance(file_name, str) and bool(file_name) and not PurePath(file_name).is_absolute()
    full = os.path.abspath(directory / file_name) if relative else ""
    if not relative or os.path.commonpath([full, os.path.abspath(root)]) != os.path.abspath(root):
        raise UserInputError(f"{source}: {origin} has file_name {file_name!r}, outside the dataset directory "
                             f"{root}; use a path relative to it")
    return directory / file_name


def image_path(source: Path, root: Path, directory: Path, file_name: Any, origin: str) -> Path:
    """Where an image the annotations name lives: `directory/file_name`, or in an images/ folder
    there; checked by `inside_path` first."""
    beside = inside_path(source, root, directory, file_name, origin)
    if beside.is_file():
        return beside
    in_images = directory / "images" / file_name
    return in_images if in_images.is_file() else beside


def first(items: list[Any], n: int = 3) -> str:
    """A short, bounded listing for one-line error messages."""
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _class_names(annotations: Annotations, classes: list[str] | None, rename: dict[str, str]) -> dict[Any, str]:
    """class key -> final class name for the kept classes, in the format's class order."""
    path, categories = annotations.source, annotations.categories
    original = list(categories.values())
    unknown = [name for name in rename if name not in original]
    if unknown:
        known = ", ".join(dict.fromkeys(original))
        raise UserInputError(f"rename: unknown class(es) {first(unknown)} in {path}; known classes: {known}")
    final = {key: rename.get(name, name) for key, name in categories.items()}
    kept = _kept_classes(annotations, classes, final)
    unnamed = [key for key, name in kept.items() if not isinstance(name, str) or not name.strip()]
    if unnamed:
        raise UserInputError(f"{path}: {annotations.key_label} {unnamed[0]!r} has the class name {kept[unnamed[0]]!r}; "
                             "a class needs a non-empty name (it is the prompt): fix the annotations or use --rename")
    return kept


def _kept_classes(annotations: Annotations, classes: list[str] | None, final: dict[Any, str]) -> dict[Any, str]:
    """The classes the split trains on: those the boxes use, or those `classes` names."""
    path = annotations.source
    if classes is None:
        used = {key for entry in annotations.images for key, _ in entry.boxes}
        kept = {key: name for key, name in final.items() if key in used}
        if not kept:
            raise UserInputError(f"{path}: no box uses any class; annotate the images or pass classes=[...]")
        return kept
    if not classes:
        raise UserInputError(f"classes: empty list for {path}; name at least one class or leave it unset for all")
    unknown = [name for name in classes if name not in final.values()]
    if unknown:
        known = ", ".join(dict.fromkeys(final.values()))
        raise UserInputError(f"classes: unknown class(es) {first(unknown)} in {path}; known classes: {known}")
    return {key: name for key, name in final.items() if name in classes}


def _image_sizes(entries: list[ImageEntry], source: Path, skip_bad_images: bool) -> list[tuple[int, int] | None]:
    """(width, height) of each entry's image; bad ones raise, or are None when skipped.

    With `skip_bad_images` every image is decoded here, not just its header, so a file broken past
    its header is skipped now instead of stopping training halfway. The size is the file's: boxes are
    normalised by what the model will see, whatever the annotations say.
    """
    sizes, bad, resized = [], [], []
    for entry in entries:
        try:
            width, height = load_image(entry.path).size if skip_bad_images else image_size(entry.path)
        except Exception:  # missing, not an image, broken header: all mean "fix this file"
            bad.append(entry.file_name)
            sizes.append(None)
            continue
        stated = entry.stated_size or (None, None)
        if all(_positive_int(v) for v in stated) and stated != (width, height):
            resized.append(f"{entry.file_name}: annotations {stated[0]}x{stated[1]}, file {width}x{height}")
        sizes.append((width, height))
    if resized:
        warnings.warn(f"{source}: {len(resized)} image(s) differ in size from their annotated width/height "
                      f"(first: {resized[0]}); using the image files' sizes", stacklevel=4)
    if bad and not skip_bad_images:
        problem = f"{len(bad)} image file(s) missing or unreadable ({first(bad)})"
        raise UserInputError(f"{source}: {problem}; {_SKIP_HINT}")
    if bad:
        warnings.warn(f"{source}: skipped {len(bad)} missing or unreadable image(s) ({first(bad)})", stacklevel=4)
    return sizes


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
