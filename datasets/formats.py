"""Recognise a dataset's annotation format by its layout, and load any split of it.

`--dataset=PATH` takes a directory in any of these layouts (or a COCO JSON file, or a YOLO data.yaml):
- YOLO: data.yaml, with images/ + labels/ per split (`datasets.yolo`)
- Pascal VOC: Annotations/, JPEGImages/, ImageSets/Main/ (`datasets.voc`)
- CSV: train.csv, valid.csv, test.csv (`datasets.tables`)
- JSONL: train.jsonl, valid.jsonl, test.jsonl (`datasets.tables`)
- parquet: a Hugging Face dataset saved as parquet files (`datasets.parquet`)
- COCO: anything else, as before (`datasets.coco`)
Every reader parses into `Annotations`, and `datasets.records.build_split` makes the split from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moondream2.errors import UserInputError

from . import parquet, tables, voc, yolo
from .coco import read_coco
from .records import Annotations, DetectionSplit, build_split
from .splits import coco_has_split, find_annotation_file


@dataclass(frozen=True)
class Format:
    name: str
    layout: str  # what makes a directory this format, for messages
    matches: Callable[[Path], bool]
    has_split: Callable[[Path, str], bool]
    read: Callable[[Path, str], Annotations]


def _read_coco(dataset: Path, split: str) -> Annotations:
    return read_coco(find_annotation_file(dataset, split), dataset if dataset.is_dir() else dataset.parent)


COCO = Format("coco", "a COCO JSON", lambda d: True, coco_has_split, _read_coco)
FORMATS = (
    Format("yolo", "data.yaml", yolo.matches, yolo.has_split, yolo.read),
    Format("voc", "Annotations/", voc.matches, voc.has_split, voc.read),
    Format("csv", "a split .csv", tables.csv_matches, tables.csv_has_split, tables.read_csv),
    Format("jsonl", "a split .jsonl", tables.jsonl_matches, tables.jsonl_has_split, tables.read_jsonl),
    Format("parquet", "parquet files", parquet.matches, parquet.has_split, parquet.read),
)


def dataset_format(dataset: str | Path) -> tuple[Format, Path]:
    """The format of `dataset` and the directory (or COCO JSON) to read it from."""
    dataset = Path(dataset)
    if not dataset.exists():
        raise UserInputError(f"{dataset}: dataset not found; pass a dataset directory or a COCO JSON file")
    if dataset.is_file():
        return (FORMATS[0], dataset.parent) if dataset.name in yolo.YAML_NAMES else (COCO, dataset)
    found = [f for f in FORMATS if f.matches(dataset)]
    if len(found) > 1:
        both = " and ".join(f"{f.name} ({f.layout})" for f in found)
        raise UserInputError(f"{dataset}: looks like both {both}; keep one format's files in the dataset directory")
    return (found[0] if found else COCO), dataset


def has_split(dataset: str | Path, split: str) -> bool:
    """Whether `dataset` has `split` at all (under any of its names), so a missing one can be skipped."""
    fmt, path = dataset_format(dataset)
    return fmt.has_split(path, split)


def load_split(
    dataset: str | Path,
    split: str,
    classes: list[str] | None = None,
    rename: dict[str, str] | None = None,
    skip_bad_images: bool = False,
) -> DetectionSplit:
    """Load `split` of `dataset` in whatever format its layout shows; `classes`/`rename` use class names.

    `rename` maps original names to new ones; `classes` keeps only those (new) names.
    """
    fmt, path = dataset_format(dataset)
    return build_split(fmt.read(path, split), classes, rename, skip_bad_images)
