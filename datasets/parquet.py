"""Read one split of a Hugging Face dataset saved as parquet, without the `datasets` package.

(Our `datasets/` folder shadows that package, and reading parquet needs only pyarrow.)

Layout: parquet files under the dataset directory whose name starts with the split's name
(`train.parquet` from `Dataset.to_parquet`, `data/train-00000-of-00002.parquet` in a hub snapshot) or
that sit in a folder named after it (`train/0000.parquet`). Columns, at the top level or inside an
`objects` column:
- `image`: the Image feature (bytes and/or path), or a path relative to the dataset directory.
  Embedded images are written once, named by their content, to images_from_parquet/SPLIT/ in the
  dataset directory, so rows showing the same image share it.
- boxes: `bbox` is [x, y, width, height] (COCO order, as Hugging Face detection datasets and RefCOCO
  store it); `boxes` or `bboxes` is [x1, y1, x2, y2]. One box per row or a list of them. Normalised
  when every coordinate of the split lies in 0..1, pixels otherwise.
- labels: `category`, `categories`, `label`, `labels` or `class` (text, or integers named by the
  ClassLabel in the file's Hugging Face metadata), or referring expressions in `phrase`, `phrases`
  or `answer` (RefCOCO): free text, each phrase a class name. A row with one box and several
  phrases gives each phrase that box.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from PIL import Image

from moondream2.errors import UserInputError

from .records import Annotations, ImageEntry, image_path
from .splits import split_aliases

IMAGE_COLUMN = "image"
BOX_COLUMNS = {"bbox": "xywh", "boxes": "xyxy", "bboxes": "xyxy"}
LABEL_COLUMNS = ("category", "categories", "label", "labels", "class", "phrase", "phrases", "answer")
EXTRACTED = "images_from_parquet"


def matches(directory: Path) -> bool:
    return bool(_parquet_files(directory))


def has_split(directory: Path, split: str) -> bool:
    return bool(_split_files(directory, split))


def read(directory: Path, split: str) -> Annotations:
    """The annotations of `split`; a row that does not fit the columns above stops the load."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserInputError("reading parquet datasets needs pyarrow: pip install pyarrow") from None
    files = _split_files(directory, split)
    if not files:
        found = sorted({p.relative_to(directory).as_posix() for p in _parquet_files(directory)})
        raise UserInputError(f"{directory}: no parquet file for split '{split}' (found: {', '.join(found[:5])}); "
                             "name files after their split (train-*.parquet) or put them in a folder named so")
    images: dict[str, ImageEntry] = {}
    categories: dict[Any, str] = {}
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise UserInputError(f"{file}: cannot read it as parquet ({e}); re-export it") from e
        columns = _columns(file, parquet.schema_arrow)
        categories.update(_class_label_names(file, parquet.schema_arrow.metadata, columns["label"]))
        extract_dir = directory / EXTRACTED / split_aliases(split)[0]
        row_number = 0
        for batch in parquet.iter_batches(batch_size=64, columns=[IMAGE_COLUMN, *columns["top"]]):
            for row in batch.to_pylist():
                where = f"{file}: row {row_number}"
                row_number += 1
                file_name = _image_file(row[IMAGE_COLUMN], where, extract_dir, directory)
                entry = images.get(file_name)
                if entry is None:
                    path = image_path(file, directory, directory, file_name, f"row {row_number - 1}")
                    entry = images[file_name] = ImageEntry(file_name, file_name, path)
                for label, box in _objects(row, columns, where):
                    entry.boxes.append((label, box))
                    if not isinstance(label, int):
                        categories.setdefault(label, label)
    unnamed = sorted({key for e in images.values() for key, _ in e.boxes if key not in categories})
    if unnamed:
        raise UserInputError(f"{files[0]}: labels are integers ({unnamed[0]}, ...) but the file's Hugging Face "
                             "metadata names no classes; store labels as text or as a ClassLabel")
    coordinates = [v for entry in images.values() for _, box in entry.boxes for v in box]
    normalized = bool(coordinates) and all(0.0 <= v <= 1.0 for v in coordinates)
    # ClassLabel ids in id order, then text labels alphabetically, so the order is not the row order
    ordered = dict(sorted(categories.items(), key=lambda kv: (0, kv[0], "") if isinstance(kv[0], int) else (1, 0, kv[0])))
    return Annotations(files[0].parent, f"parquet ({'normalised' if normalized else 'pixel'} coordinates)",
                       ordered, list(images.values()), normalized, key_label="label")


def _parquet_files(directory: Path) -> list[Path]:
    """Parquet files up to two folders deep (hub snapshots keep them in data/ or CONFIG/SPLIT/)."""
    return sorted(p for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet") for p in directory.glob(pattern))


def _split_files(directory: Path, split: str) -> list[Path]:
    names = split_aliases(split)
    return [p for p in _parquet_files(directory)
            if p.parent.name in names or any(p.stem == n or p.stem.startswith(f"{n}-") for n in names)]


def _columns(file: Path, schema) -> dict[str, Any]:
    """Which columns hold the image, boxes and labels, and whether they sit inside `objects`."""
    top = schema.names
    if IMAGE_COLUMN not in top:
        raise UserInputError(f"{file}: no '{IMAGE_COLUMN}' column (columns: {', '.join(top)}); name the image column so")
    nested = _struct_fields(schema.field("objects").type) if "objects" in top else []
    for where, names in (("objects", nested), ("", top)):
        box = next((c for c in BOX_COLUMNS if c in names), None)
        label = next((c for c in LABEL_COLUMNS if c in names), None)
        if box and label:
            return {"objects": where, "box": box, "label": label, "top": ["objects"] if where else [box, label]}
    shown = ", ".join(top + [f"objects.{n}" for n in nested])
    raise UserInputError(f"{file}: found no box column ({'/'.join(BOX_COLUMNS)}) with a label column "
                         f"({'/'.join(LABEL_COLUMNS)}) (columns: {shown})")


def _struct_fields(arrow_type) -> list[str]:
    """Field names of a struct, or of a list of structs."""
    while hasattr(arrow_type, "value_type"):
        arrow_type = arrow_type.value_type
    return [arrow_type.field(i).name for i in range(arrow_type.num_fields)] if hasattr(arrow_type, "num_fields") else []


def _class_label_names(file: Path, metadata: dict | None, column: str) -> dict[int, str]:
    """id -> name from the ClassLabel of `column` in the Hugging Face metadata, if there is one."""
    try:
        features = json.loads((metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (json.JSONDecodeError, AttributeError):
        return {}

    def find(node: Any, inside: bool) -> list | None:
        if isinstance(node, dict):
            if inside and node.get("_type") == "ClassLabel" and isinstance(node.get("names"), list):
                return node["names"]
            for key, child in node.items():
                found = find(child, inside or key == column)
                if found is not None:
                    return found
        return None

    names = find(features, False) or []
    return {i: str(name) for i, name in enumerate(names)}


def _image_file(value: Any, where: str, extract_dir: Path, root: Path) -> str:
    """The image's path relative to the dataset directory, writing embedded bytes out first."""
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
    if data:
        return _extract(data, extract_dir).relative_to(root).as_posix()
    name = value.get("path") if isinstance(value, dict) else value
    if not isinstance(name, str) or not name:
        raise UserInputError(f"{where}: the image is neither bytes nor a path; re-export the image column")
    return name


def _extract(data: bytes, directory: Path) -> Path:
    """Write an embedded image once, named by its content; a partial file from a killed run is
    never left under the final name."""
    try:
        suffix = "." + (Image.open(io.BytesIO(data)).format or "img").lower()
    except Exception:  # not an image: written as it is, and reported unreadable like any bad image
        suffix = ".img"
    path = directory / f"{hashlib.sha1(data).hexdigest()[:20]}{suffix}"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise UserInputError(f"{directory}: cannot write the images embedded in the parquet files ({e}); "
                             "copy the dataset to a folder you can write to") from e
    return path


def _objects(row: dict, columns: dict, where: str) -> list[tuple[Any, tuple[float, float, float, float]]]:
    """(label, x1 y1 x2 y2) for every box of a row."""
    source = row.get("objects") if columns["objects"] else row
    if isinstance(source, list):  # a list of {bbox, label} structs
        boxes = [o.get(columns["box"]) for o in source if isinstance(o, dict)]
        labels = [o.get(columns["label"]) for o in source if isinstance(o, dict)]
    elif isinstance(source, dict):
        boxes, labels = source.get(columns["box"]), source.get(columns["label"])
    else:
        boxes, labels = [], []
    boxes = [] if boxes is None else [boxes] if _is_box(boxes) else boxes
    labels = [] if labels is None else labels if isinstance(labels, list) else [labels]
    if len(boxes) == 1 and len(labels) > 1 and all(isinstance(x, str) for x in labels):
        boxes = boxes * len(labels)  # referring expressions: several phrases for one box
    if len(boxes) != len(labels):
        raise UserInputError(f"{where}: {len(boxes)} box(es) but {len(labels)} label(s); give one label per box")
    objects = []
    for box, label in zip(boxes, labels):
        if not _is_box(box):
            raise UserInputError(f"{where}: {columns['box']} {box!r} is not 4 numbers")
        if isinstance(label, str):
            label = label.strip()
        if not (isinstance(label, str) and label) and not (isinstance(label, int) and not isinstance(label, bool)):
            raise UserInputError(f"{where}: label {label!r} is neither a class name nor a class id")
        a, b, c, d = (float(v) for v in box)
        objects.append((label, (a, b, a + c, b + d) if BOX_COLUMNS[columns["box"]] == "xywh" else (a, b, c, d)))
    return objects


def _is_box(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
