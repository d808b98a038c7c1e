"""Load one split of a COCO-style detection dataset into (image, class) training samples.

Conventions:
- Class names come from the categories. A category no annotation uses is skipped (this drops
  Roboflow's placeholder category, usually id 0 named after the dataset); one that is used is a
  real class, whatever its id. Categories renamed to the same name are merged.
- `iscrowd=1` annotations are excluded: they mark groups, not objects to enumerate.
- Boxes are clipped to the image and normalized to 0..1; boxes left with zero area are dropped
  with one warning that counts them.
- Image width/height come from the image file; a JSON size that disagrees is counted in one warning.
- Image paths (`file_name`) must stay inside the dataset directory: no absolute paths, no `..` escapes.
"""

import json
import math
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from moondream2.errors import UserInputError

from .boxes import Box, canonical_order, coco_to_normalized
from .images import image_size, load_image
from .splits import find_annotation_file

_REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
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


def load_split(
    dataset: str | Path,
    split: str,
    classes: list[str] | None = None,
    rename: dict[str, str] | None = None,
    skip_bad_images: bool = False,
) -> DetectionSplit:
    """Load `split` of `dataset` (directory or COCO JSON); `classes`/`rename` use category names.

    `rename` maps original names to new ones; `classes` keeps only those (new) names.
    """
    json_path = find_annotation_file(dataset, split)
    coco = _read_json(json_path)
    _check_structure(coco, json_path)
    if not coco["images"]:
        raise UserInputError(f"{json_path}: the split has no images; add images or pick another split")
    class_of = _category_names(coco, json_path, classes, rename or {})
    root = Path(dataset) if Path(dataset).is_dir() else Path(dataset).parent
    sizes = _image_sizes(coco["images"], json_path, root, skip_bad_images)
    if not sizes:
        raise UserInputError(f"{json_path}: no usable images left after skipping bad ones; fix the image files")

    boxes: dict[Any, dict[str, list[Box]]] = {image_id: {} for image_id in sizes}
    n_dropped = 0
    for ann in coco["annotations"]:
        name = class_of.get(ann["category_id"])
        if name is None or ann.get("iscrowd", 0) == 1 or ann["image_id"] not in sizes:
            continue
        _, width, height = sizes[ann["image_id"]]
        box = coco_to_normalized(ann["bbox"], width, height)
        if box is None:
            n_dropped += 1
        else:
            boxes[ann["image_id"]].setdefault(name, []).append(box)
    if n_dropped:
        warnings.warn(f"{json_path}: dropped {n_dropped} box(es) with zero area or outside the image", stacklevel=2)

    images = [
        ImageRecord(path, width, height, image_id, {k: list(canonical_order(v)) for k, v in boxes[image_id].items()})
        for image_id, (path, width, height) in sizes.items()
    ]
    return DetectionSplit(images, list(dict.fromkeys(class_of.values())), json_path)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise UserInputError(f"{path}: malformed JSON at {where} ({e.msg}); fix or re-export it") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: cannot read annotations ({e})") from e


def _first(items: list[Any], n: int = 3) -> str:
    """A short, bounded listing for one-line error messages."""
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _check_structure(coco: Any, path: Path) -> None:
    """Fail early, in one line, on anything the loader would otherwise trip over later."""
    if not isinstance(coco, dict):
        raise UserInputError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    missing = [key for key in _REQUIRED_KEYS if not isinstance(coco.get(key), list)]
    if missing:
        raise UserInputError(f"{path}: missing required list(s) {_first(missing)}; is this a COCO instances file?")
    for section, keys in _REQUIRED_KEYS.items():
        bad = [i for i, e in enumerate(coco[section]) if not isinstance(e, dict) or any(k not in e for k in keys)]
        if bad:
            raise UserInputError(
                f"{path}: {len(bad)} '{section}' entries lack required keys {keys} (first at index {bad[0]})"
            )
    for section in ("images", "categories"):
        dupes = sorted((i for i, n in Counter(entry["id"] for entry in coco[section]).items() if n > 1), key=str)
        if dupes:
            raise UserInputError(f"{path}: duplicate '{section}' ids {_first(dupes)}; ids must be unique")
    bad_boxes = [a for a in coco["annotations"] if not _is_bbox(a["bbox"])]
    if bad_boxes:
        raise UserInputError(
            f"{path}: {len(bad_boxes)} annotations have a bbox that is not [x, y, width, height] numbers "
            f"(first: annotation id {bad_boxes[0].get('id')!r}, bbox {bad_boxes[0]['bbox']!r})"
        )
    for key, section in (("image_id", "images"), ("category_id", "categories")):
        known = {entry["id"] for entry in coco[section]}
        unknown = sorted({a[key] for a in coco["annotations"]} - known, key=str)
        if unknown:
            raise UserInputError(
                f"{path}: annotations refer to unknown {key}(s) {_first(unknown)} not listed in '{section}'"
            )


def _is_bbox(bbox: Any) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)


def _is_number(value: Any) -> bool:
    """JSON numbers only: `true` parses as a Python bool, which is an int, and is not a coordinate."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _category_names(coco: dict, path: Path, classes: list[str] | None, rename: dict[str, str]) -> dict[Any, str]:
    """category id -> final class name for the kept categories, in category-id order."""
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    original = [c["name"] for c in categories]
    unknown = [name for name in rename if name not in original]
    if unknown:
        known = ", ".join(original)
        raise UserInputError(f"rename: unknown class(es) {_first(unknown)} in {path}; known classes: {known}")
    final = {c["id"]: rename.get(c["name"], c["name"]) for c in categories}
    kept = _kept_categories(coco, path, classes, final)
    unnamed = [cid for cid, name in kept.items() if not isinstance(name, str) or not name.strip()]
    if unnamed:
        raise UserInputError(f"{path}: category id {unnamed[0]!r} has the class name {kept[unnamed[0]]!r}; "
                             "a class needs a non-empty name (it is the prompt): fix the JSON or use --rename")
    return kept


def _kept_categories(coco: dict, path: Path, classes: list[str] | None, final: dict[Any, str]) -> dict[Any, str]:
    """The categories the split trains on: those annotations use, or those `classes` names."""
    if classes is None:
        used = {a["category_id"] for a in coco["annotations"]}
        kept = {cid: name for cid, name in final.items() if cid in used}
        if not kept:
            raise UserInputError(f"{path}: no annotation uses any category; annotate the images or pass classes=[...]")
        return kept
    if not classes:
        raise UserInputError(f"classes: empty list for {path}; name at least one class or leave it unset for all")
    unknown = [name for name in classes if name not in final.values()]
    if unknown:
        known = ", ".join(dict.fromkeys(final.values()))
        raise UserInputError(f"classes: unknown class(es) {_first(unknown)} in {path}; known classes: {known}")
    return {cid: name for cid, name in final.items() if name in classes}


def _image_sizes(entries: list[dict], json_path: Path, root: Path,
                 skip_bad_images: bool) -> dict[Any, tuple[Path, int, int]]:
    """image id -> (path, width, height) for every readable image; bad ones raise or are skipped.

    With `skip_bad_images` every image is decoded here, not just its header, so a file broken past
    its header is skipped now instead of stopping training halfway. The size is the file's: boxes are
    normalised by what the model will see, whatever the JSON says.
    """
    sizes, bad, resized = {}, [], []
    for entry in entries:
        _check_inside(entry, json_path, root)
        path = _resolve_image(json_path.parent, entry["file_name"])
        try:
            width, height = load_image(path).size if skip_bad_images else image_size(path)
        except Exception:  # missing, not an image, broken header: all mean "fix this file"
            bad.append(entry["file_name"])
            continue
        stated = (entry.get("width"), entry.get("height"))
        if all(_positive_int(v) for v in stated) and stated != (width, height):
            resized.append(f"{entry['file_name']}: JSON {stated[0]}x{stated[1]}, file {width}x{height}")
        sizes[entry["id"]] = (path, width, height)
    if resized:
        warnings.warn(f"{json_path}: {len(resized)} image(s) differ in size from their JSON width/height "
                      f"(first: {resized[0]}); using the image files' sizes", stacklevel=3)
    if bad and not skip_bad_images:
        problem = f"{len(bad)} image file(s) missing or unreadable ({_first(bad)})"
        raise UserInputError(f"{json_path}: {problem}; {_SKIP_HINT}")
    if bad:
        warnings.warn(f"{json_path}: skipped {len(bad)} missing or unreadable image(s) ({_first(bad)})", stacklevel=3)
    return sizes


def _check_inside(entry: dict, json_path: Path, root: Path) -> None:
    """Refuse image paths that leave the dataset directory: a dataset must not read files elsewhere."""
    file_name = entry["file_name"]
    relative = isinstance(file_name, str) and bool(file_name) and not PurePath(file_name).is_absolute()
    full = os.path.abspath(json_path.parent / file_name) if relative else ""
    if not relative or os.path.commonpath([full, os.path.abspath(root)]) != os.path.abspath(root):
        raise UserInputError(f"{json_path}: image id {entry['id']!r} has file_name {file_name!r}, outside the "
                             f"dataset directory {root}; use a path relative to it")


def _resolve_image(directory: Path, file_name: str) -> Path:
    """Images live next to the JSON or in an images/ folder beside it."""
    beside = directory / file_name
    if beside.is_file():
        return beside
    in_images = directory / "images" / file_name
    return in_images if in_images.is_file() else beside


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
