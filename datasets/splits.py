"""Find a split's annotations by name, so users pass a dataset folder and a split.

COCO layouts understood inside a dataset directory, for a split named NAME:
- Roboflow export: NAME/_annotations.coco.json with the images beside it.
- Plain COCO: NAME.json with the images beside it or in images/.
A JSON file passed directly is used as-is, whatever split is asked for. Formats with one file per
split (CSV, JSONL) find theirs with `split_file`. In every format "val", "valid" and "validation"
are aliases of one another.
"""

from pathlib import Path

from moondream2.errors import UserInputError

ROBOFLOW_JSON = "_annotations.coco.json"
_VALIDATION_NAMES = ("valid", "val", "validation")


def split_aliases(split: str) -> tuple[str, ...]:
    """Directory/file names a split may go by."""
    return _VALIDATION_NAMES if split in _VALIDATION_NAMES else (split,)


def split_file(directory: Path, split: str, suffix: str, prefixes: tuple[str, ...] = ("",)) -> Path | None:
    """`directory/{prefix}{NAME}{suffix}` for the first of the split's names (and prefixes) that exists."""
    for name in split_aliases(split):
        for prefix in prefixes:
            if (directory / f"{prefix}{name}{suffix}").is_file():
                return directory / f"{prefix}{name}{suffix}"
    return None


def coco_has_split(dataset: Path, split: str) -> bool:
    """Whether a COCO dataset has `split` at all (a folder or JSON under any of its names); a JSON
    file given as the dataset serves every split."""
    return dataset.is_file() or any((dataset / a).exists() or (dataset / f"{a}.json").exists()
                                    for a in split_aliases(split))


def available_splits(directory: Path) -> list[str]:
    """COCO split names present in a dataset directory, for error messages."""
    names = {p.parent.name for p in directory.glob(f"*/{ROBOFLOW_JSON}")}
    names |= {p.stem for p in directory.glob("*.json")}
    return sorted(names)


def find_annotation_file(dataset: str | Path, split: str) -> Path:
    """Path of the COCO JSON holding `split` of `dataset` (a directory or a JSON file)."""
    dataset = Path(dataset)
    if dataset.is_file():
        return dataset
    if not dataset.is_dir():
        raise UserInputError(f"{dataset}: dataset not found; pass a dataset directory or a COCO JSON file")
    for name in split_aliases(split):
        for candidate in (dataset / name / ROBOFLOW_JSON, dataset / f"{name}.json"):
            if candidate.is_file():
                return candidate
    for name in split_aliases(split):
        if (dataset / name).is_dir():
            raise UserInputError(f"{dataset / name}: missing {ROBOFLOW_JSON}; put the split's COCO annotations there")
    found = ", ".join(available_splits(dataset)) or "none"
    raise UserInputError(f"{dataset}: split '{split}' not found (splits found: {found}); pass one of those")
