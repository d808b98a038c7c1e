"""Read one split of a YOLO (Ultralytics, Roboflow "YOLOv5/v8" export) detection dataset.

Layout: `data.yaml` with `names` (a list, or an {id: name} mapping), and per split either
`images/NAME/` + `labels/NAME/` (Ultralytics) or `NAME/images/` + `NAME/labels/` (Roboflow). An
image's labels are the .txt of the same relative path under labels/, one `class cx cy w h` row per
box, normalised to 0..1. An empty label file, or none at all, makes the image a negative; a label
file without its image is a missing image. The
split paths written in data.yaml are not read: exports often write them for another machine.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import yaml

from moondream2.errors import UserInputError

from .records import Annotations, ImageEntry, first
from .splits import split_aliases

YAML_NAMES = ("data.yaml", "data.yml")
IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".mpo", ".dng", ".pfm"}


def matches(directory: Path) -> bool:
    return any((directory / name).is_file() for name in YAML_NAMES)


def has_split(directory: Path, split: str) -> bool:
    return _split_dirs(directory, split) is not None


def read(directory: Path, split: str) -> Annotations:
    """The annotations of `split`; each bad label row stops the load with its file and line."""
    yaml_path = next(directory / name for name in YAML_NAMES if (directory / name).is_file())
    names = _class_names(yaml_path)
    found = _split_dirs(directory, split)
    if found is None:
        layouts = " or ".join(f"{a}/{b}" for a, b in (("images", split), (split, "images")))
        raise UserInputError(f"{directory}: YOLO split '{split}' not found (looked for {layouts}); "
                             f"splits found: {', '.join(_available(directory)) or 'none'}")
    images_dir, labels_dir = found
    if not labels_dir.is_dir():
        raise UserInputError(f"{labels_dir}: missing; put the split's label .txt files there")
    entries, unlabelled, labelled = [], [], set()
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        label_file = (labels_dir / path.relative_to(images_dir)).with_suffix(".txt")
        name = path.relative_to(directory).as_posix()
        boxes = _read_labels(label_file, names) if label_file.is_file() else []
        if not label_file.is_file():
            unlabelled.append(name)
        labelled.add(label_file)
        entries.append(ImageEntry(name, name, path, boxes))
    for label_file in sorted(set(labels_dir.rglob("*.txt")) - labelled):  # its image is missing: say so as for any format
        name = f"{label_file.relative_to(directory).as_posix()} has no image"
        entries.append(ImageEntry(name, name, images_dir / label_file.relative_to(labels_dir).with_suffix("")))
    if unlabelled:
        warnings.warn(f"{labels_dir}: {len(unlabelled)} image(s) have no label file ({first(unlabelled)}); "
                      "read as negatives (no objects)", stacklevel=3)
    return Annotations(images_dir, "yolo", names, entries, normalized=True, key_label="class id")


def _class_names(yaml_path: Path) -> dict[int, str]:
    """class id -> name from data.yaml's `names`."""
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserInputError(f"{yaml_path}: malformed YAML ({' '.join(str(e).split())}); fix or re-export it") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{yaml_path}: cannot read it ({e})") from e
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names or not all(_is_int(k) and k >= 0 for k in names):
        raise UserInputError(f"{yaml_path}: needs 'names', a list of class names or an {{id: name}} mapping")
    bad = [k for k, v in names.items() if not isinstance(v, (str, int, float)) or isinstance(v, bool)]
    if bad:
        raise UserInputError(f"{yaml_path}: class {bad[0]} has the name {names[bad[0]]!r}; quote it to make it text")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise UserInputError(f"{yaml_path}: nc is {nc} but 'names' lists {len(names)} classes; make them agree")
    return {k: str(v) for k, v in sorted(names.items())}


def _read_labels(path: Path, names: dict[int, str]) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(class id, normalised x1 y1 x2 y2) for every row of one label file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: cannot read labels ({e})") from e
    boxes = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}: line {number}"
        if len(fields) != 5:
            raise UserInputError(f"{where}: {len(fields)} values, expected 5 ('class cx cy w h'); "
                                 "segmentation polygons are not read, export boxes")
        try:
            class_id, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise UserInputError(f"{where}: {line.strip()!r} is not 'class cx cy w h' numbers") from None
        if class_id not in names:
            raise UserInputError(f"{where}: unknown class id {class_id}; data.yaml names ids "
                                 f"{min(names)}..{max(names)}")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise UserInputError(f"{where}: box {' '.join(fields[1:])} is outside the image; YOLO coordinates "
                                 "are fractions of the image size, 0..1 (pixel values? divide by the image size)")
        cx, cy, w, h = values
        boxes.append((class_id, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
    return boxes


def _split_dirs(directory: Path, split: str) -> tuple[Path, Path] | None:
    """(images dir, labels dir) of the split in either layout."""
    for name in split_aliases(split):
        for images, labels in ((directory / "images" / name, directory / "labels" / name),
                               (directory / name / "images", directory / name / "labels")):
            if images.is_dir():
                return images, labels
    return None


def _available(directory: Path) -> list[str]:
    named = {p.name for p in (directory / "images").glob("*") if p.is_dir()}
    return sorted(named | {p.parent.name for p in directory.glob("*/images") if p.is_dir()})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
