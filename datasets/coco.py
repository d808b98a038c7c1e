"""Read one split of a COCO-style detection dataset (a Roboflow export or a plain instances JSON).

COCO specifics; everything shared with the other formats (classes, image checks, box clipping) is in
`datasets.records`:
- Class names come from the categories, in category-id order; a category no annotation uses is
  skipped (this drops Roboflow's placeholder category, usually id 0 named after the dataset).
- `iscrowd=1` annotations are excluded: they mark groups, not objects to enumerate.
- Images live next to the JSON or in an images/ folder beside it.
"""

import json
from collections import Counter
from pathlib import Path
from typing import Any

from moondream2.errors import UserInputError

from .records import Annotations, ImageEntry, first, image_path

_REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def read_coco(json_path: Path, root: Path) -> Annotations:
    """The annotations of one COCO JSON whose images must stay inside `root`."""
    coco = _read_json(json_path)
    _check_structure(coco, json_path)
    entries = {}
    for image in coco["images"]:
        path = image_path(json_path, root, json_path.parent, image["file_name"], f"image id {image['id']!r}")
        entries[image["id"]] = ImageEntry(image["id"], image["file_name"], path,
                                          stated_size=(image.get("width"), image.get("height")))
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0) != 1:
            x, y, w, h = ann["bbox"]
            entries[ann["image_id"]].boxes.append((ann["category_id"], (x, y, x + w, y + h)))
    categories = {c["id"]: c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])}
    return Annotations(json_path, "coco", categories, list(entries.values()))


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise UserInputError(f"{path}: malformed JSON at {where} ({e.msg}); fix or re-export it") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: cannot read annotations ({e})") from e


def _check_structure(coco: Any, path: Path) -> None:
    """Fail early, in one line, on anything the loader would otherwise trip over later."""
    if not isinstance(coco, dict):
        raise UserInputError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    missing = [key for key in _REQUIRED_KEYS if not isinstance(coco.get(key), list)]
    if missing:
        raise UserInputError(f"{path}: missing required list(s) {first(missing)}; is this a COCO instances file?")
    for section, keys in _REQUIRED_KEYS.items():
        bad = [i for i, e in enumerate(coco[section]) if not isinstance(e, dict) or any(k not in e for k in keys)]
        if bad:
            raise UserInputError(
                f"{path}: {len(bad)} '{section}' entries lack required keys {keys} (first at index {bad[0]})"
            )
    for section in ("images", "categories"):
        dupes = sorted((i for i, n in Counter(entry["id"] for entry in coco[section]).items() if n > 1), key=str)
        if dupes:
            raise UserInputError(f"{path}: duplicate '{section}' ids {first(dupes)}; ids must be unique")
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
                f"{path}: annotations refer to unknown {key}(s) {first(unknown)} not listed in '{section}'"
            )


def _is_bbox(bbox: Any) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)


def _is_number(value: Any) -> bool:
    """JSON numbers only: `true` parses as a Python bool, which is an int, and is not a coordinate."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
