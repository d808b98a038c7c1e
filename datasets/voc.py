"""Read one split of a Pascal VOC detection dataset (VOC itself, or a CVAT / Roboflow VOC export).

Layout: `Annotations/ID.xml`, `JPEGImages/`, and `ImageSets/Main/NAME.txt` listing the image ids of
each split. An XML gives the image's `<filename>` in JPEGImages/ (ID.jpg when absent), its `<size>`,
and an `<object>` with `<name>` and `<bndbox>` per box. Coordinates follow the VOC devkit: 1-based
pixels, both corners inclusive, so (xmin, ymin, xmax, ymax) covers pixels xmin-1 .. xmax.
`<difficult>` objects are kept: they are objects, and leaving them out would teach "nothing here".
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from moondream2.errors import UserInputError

from .records import Annotations, ImageEntry, image_path, inside_path
from .splits import split_file

SPLIT_DIR = Path("ImageSets") / "Main"
CORNERS = ("xmin", "ymin", "xmax", "ymax")


def matches(directory: Path) -> bool:
    return (directory / "Annotations").is_dir()


def has_split(directory: Path, split: str) -> bool:
    return split_file(directory / SPLIT_DIR, split, ".txt") is not None


def read(directory: Path, split: str) -> Annotations:
    """The annotations of `split`; a bad XML stops the load naming the file and the object."""
    list_file = split_file(directory / SPLIT_DIR, split, ".txt")
    if list_file is None:
        found = sorted(p.stem for p in (directory / SPLIT_DIR).glob("*.txt") if "_" not in p.stem)
        raise UserInputError(f"{directory / SPLIT_DIR}: no {split}.txt listing the split's image ids "
                             f"(splits found: {', '.join(found) or 'none'}); add one")
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{list_file}: cannot read it ({e})") from e
    entries, names = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        xml_path = inside_path(list_file, directory, directory / "Annotations", f"{image_id}.xml", f"line {number}")
        if not xml_path.is_file():
            raise UserInputError(f"{list_file}: line {number}: image id {image_id!r} has no {xml_path}; "
                                 "add its annotation or remove the line")
        entry = _read_xml(xml_path, directory, image_id)
        names.update(key for key, _ in entry.boxes)
        entries.append(entry)
    return Annotations(list_file, "voc", {name: name for name in sorted(names)}, entries, key_label="class")


def _read_xml(xml_path: Path, root: Path, image_id: str) -> ImageEntry:
    try:
        tree = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as e:
        raise UserInputError(f"{xml_path}: malformed XML ({e}); fix or re-export it") from e
    file_name = (tree.findtext("filename") or "").strip() or f"{image_id}.jpg"
    path = image_path(xml_path, root, root / "JPEGImages", file_name, "<filename>")
    size = tuple(_int_or_none(tree.findtext(f"size/{side}")) for side in ("width", "height"))
    boxes = []
    for index, obj in enumerate(tree.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise UserInputError(f"{xml_path}: object {index} has no <name>; name its class")
        values = [_number(obj.findtext(f"bndbox/{corner}")) for corner in CORNERS]
        if any(v is None for v in values):
            raise UserInputError(f"{xml_path}: object {index} ({name}) needs numeric <bndbox> "
                                 f"{'/'.join(CORNERS)}")
        x_min, y_min, x_max, y_max = values
        boxes.append((name, (x_min - 1, y_min - 1, x_max, y_max)))
    return ImageEntry(image_id, file_name, path, boxes, stated_size=size)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
