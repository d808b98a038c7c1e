"""Read one split of a dataset kept as one annotation file per split: CSV or JSONL.

The file is `NAME.csv` / `NAME.jsonl` in the dataset directory (SKU-110K's `annotations_NAME.csv`
too), and image paths in it are relative to that directory (or its images/ folder).
- CSV, one box per row: `image,x1,y1,x2,y2,label[,width,height]` in pixels, as SKU-110K ships it.
  A header row is optional; when there, it must name those columns in that order. A row with only
  an image (`img.jpg,,,,,`) lists an image without objects, a negative.
- JSONL, one image per line: `{"image": PATH, "objects": [{"label": NAME, "bbox": [x1, y1, x2, y2]}]}`.
  Coordinates are normalised (fractions of the image size) when every coordinate in the file lies in
  0..1, pixels otherwise; the split's format says which was read. `"objects": []` is a negative.
An image on several rows or lines gathers all their boxes.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from moondream2.errors import UserInputError

from .records import Annotations, ImageEntry, image_path
from .splits import split_aliases, split_file

CSV_COLUMNS = ("image", "x1", "y1", "x2", "y2", "label", "width", "height")
CSV_PREFIXES = ("", "annotations_")  # SKU-110K names its files annotations_train.csv, ...


def csv_matches(directory: Path) -> bool:
    return any(csv_has_split(directory, split) for split in ("train", "valid", "test"))


def csv_has_split(directory: Path, split: str) -> bool:
    return split_file(directory, split, ".csv", CSV_PREFIXES) is not None


def jsonl_matches(directory: Path) -> bool:
    return any(jsonl_has_split(directory, split) for split in ("train", "valid", "test"))


def jsonl_has_split(directory: Path, split: str) -> bool:
    return split_file(directory, split, ".jsonl") is not None


def read_csv(directory: Path, split: str) -> Annotations:
    """The annotations of `split` from its CSV; a bad row stops the load with its line."""
    path = _required(directory, split, ".csv", CSV_PREFIXES)
    images: dict[str, ImageEntry] = {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                if row and not (reader.line_num == 1 and _is_header(row, where)):
                    _add_csv_row(row, where, path, directory, images)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserInputError(f"{path}: cannot read it as CSV ({e})") from e
    return _annotations(path, "csv", images, normalized=False)


def read_jsonl(directory: Path, split: str) -> Annotations:
    """The annotations of `split` from its JSONL; a bad line stops the load with its number."""
    path = _required(directory, split, ".jsonl")
    images: dict[str, ImageEntry] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: cannot read it ({e})") from e
    for number, line in enumerate(lines, 1):
        if line.strip():
            _add_jsonl_line(line, f"{path}: line {number}", path, directory, images)
    coordinates = [v for entry in images.values() for _, box in entry.boxes for v in box]
    normalized = bool(coordinates) and all(0.0 <= v <= 1.0 for v in coordinates)
    return _annotations(path, f"jsonl ({'normalised' if normalized else 'pixel'} coordinates)", images, normalized)


def _required(directory: Path, split: str, suffix: str, prefixes: tuple[str, ...] = ("",)) -> Path:
    path = split_file(directory, split, suffix, prefixes)
    if path is None:
        found = sorted(p.name for p in directory.glob(f"*{suffix}"))
        names = " or ".join(f"{name}{suffix}" for name in split_aliases(split))
        raise UserInputError(f"{directory}: no {names} for split '{split}' (found: {', '.join(found) or 'none'}); "
                             "add one or pick another split")
    return path


def _annotations(path: Path, format_name: str, images: dict[str, ImageEntry], normalized: bool) -> Annotations:
    """Class names sorted, so the class order does not depend on the row order."""
    names = sorted({key for entry in images.values() for key, _ in entry.boxes})
    return Annotations(path, format_name, {n: n for n in names}, list(images.values()), normalized, key_label="label")


def _entry(images: dict[str, ImageEntry], file_name: Any, where: str, path: Path, directory: Path) -> ImageEntry:
    """The image `file_name` names, created on first mention."""
    if isinstance(file_name, str) and file_name in images:
        return images[file_name]
    origin = where.removeprefix(f"{path}: ")
    entry = ImageEntry(file_name, file_name, image_path(path, directory, directory, file_name, origin))
    images[file_name] = entry
    return entry


def _is_header(row: list[str], where: str) -> bool:
    """Whether the first row names the columns (its coordinates are not numbers); a header in
    another order would misread every row, so it must be ours."""
    if len(row) > 1 and _float(row[1]) is not None:
        return False
    names = tuple(cell.strip().lower() for cell in row)
    if names not in (CSV_COLUMNS[:6], CSV_COLUMNS):
        raise UserInputError(f"{where}: header {','.join(row)!r} is not {','.join(CSV_COLUMNS[:6])}[,width,height]; "
                             "reorder the columns or drop the header")
    return True


def _add_csv_row(row: list[str], where: str, path: Path, directory: Path, images: dict[str, ImageEntry]) -> None:
    if len(row) not in (6, 8):
        raise UserInputError(f"{where}: {len(row)} columns, expected 6 or 8 "
                             f"({','.join(CSV_COLUMNS[:6])}[,width,height])")
    file_name, box_fields, label = row[0].strip(), row[1:5], row[5].strip()
    entry = _entry(images, file_name, where, path, directory)
    if len(row) == 8:
        entry.stated_size = (_int(row[6]), _int(row[7]))
    if not label and not any(cell.strip() for cell in box_fields):
        return  # an image without objects
    box = [_float(v) for v in box_fields]
    if any(v is None for v in box):
        raise UserInputError(f"{where}: x1,y1,x2,y2 {','.join(box_fields)!r} are not all numbers")
    if not label:
        raise UserInputError(f"{where}: the label is empty; every box needs a class name")
    entry.boxes.append((label, tuple(box)))


def _add_jsonl_line(line: str, where: str, path: Path, directory: Path, images: dict[str, ImageEntry]) -> None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{where}: malformed JSON at column {e.colno} ({e.msg}); one object per line") from e
    if not isinstance(record, dict) or "image" not in record or not isinstance(record.get("objects"), list):
        raise UserInputError(f'{where}: expected {{"image": PATH, "objects": [...]}}')
    entry = _entry(images, record["image"], where, path, directory)
    for index, obj in enumerate(record["objects"], 1):
        label = obj.get("label") if isinstance(obj, dict) else None
        if not isinstance(label, str) or not label.strip():
            raise UserInputError(f"{where}: object {index} has no label; every box needs a class name")
        bbox = obj.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
            raise UserInputError(f"{where}: object {index} ({label}) has bbox {bbox!r}, not [x1, y1, x2, y2] numbers")
        entry.boxes.append((label.strip(), tuple(float(v) for v in bbox)))


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
