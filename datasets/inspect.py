"""See that a dataset is read right before training on it: what was found, numbers per split,
warnings, and a contact sheet of sample images with their boxes.

    python -m datasets.inspect PATH [--out=dataset-inspect] [--num_pictures=16]

Prints the format found; per split the images, boxes and classes, boxes per image and box sizes
(min/median/max); warnings (what the loader warned about, tiny boxes, boxes reaching outside the
image, classes seen in one split only); and writes `contact_sheet_SPLIT.png` per split to --out.
"""

from __future__ import annotations

import random
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.files import atomic_write
from finetune.cli import flag, run_cli
from finetune.validation import check_field_types, check_output_dir, require
from finetune.visualize import contact_sheet, draw_detections

from .formats import dataset_format
from .images import load_image
from .records import Annotations, DetectionSplit, build_split

SPLITS = ("train", "valid", "test")
TINY_PX = 4  # a box narrower or lower than this many pixels is hard to see, and to learn


@dataclass
class InspectConfig:
    dataset: str = flag("datasets/chess-pieces", "the dataset directory (or COCO JSON / YOLO data.yaml); may also be "
                                                 "given first, without --dataset=")
    out: str = flag("dataset-inspect", "directory for contact_sheet_SPLIT.png")
    num_pictures: int = flag(16, "sample images drawn per split (0: none)")
    seed: int = flag(0, "which images are sampled")
    classes: tuple | None = flag(None, "only these class names, as a trainer would read them")
    rename: dict | None = flag(None, "rename classes, as a trainer would")
    skip_bad_images: bool = flag(False, "skip unreadable images instead of stopping, as a trainer would")

    def __post_init__(self):
        check_field_types(self)
        require(self, "num_pictures", self.num_pictures >= 0, "use 0 or more")
        check_output_dir("out", self.out)


def main(config: InspectConfig) -> dict[str, Any]:
    """Read every split present the way a trainer does, report on it, and draw samples."""
    fmt, path = dataset_format(config.dataset)
    splits: dict[str, DetectionSplit] = {}
    report: dict[str, Any] = {"dataset": str(config.dataset), "format": fmt.name, "splits": {}, "warnings": []}
    for name in SPLITS:
        if not fmt.has_split(path, name):
            continue
        annotations = fmt.read(path, name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            split = build_split(annotations, list(config.classes) if config.classes else None, config.rename,
                                config.skip_bad_images)
        splits[name] = split
        report["format"] = split.format
        report["splits"][name] = split_summary(split)
        report["warnings"] += [f"{name}: {w.message}" for w in caught]
        report["warnings"] += [f"{name}: {text}" for text in box_warnings(annotations, split)]
    report["warnings"] += class_warnings(splits)
    if config.num_pictures:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, split in splits.items():
            sheet = out / f"contact_sheet_{name}.png"
            picture = draw_samples(split, config.num_pictures, config.seed)
            atomic_write(sheet, lambda tmp: picture.save(tmp, format="PNG"))
            report["splits"][name]["contact_sheet"] = str(sheet)
    sys.stdout.write(format_report(report))
    return report


def split_summary(split: DetectionSplit) -> dict[str, Any]:
    """Counts and spreads of one split: what a user checks against what they exported."""
    per_image = [sum(len(b) for b in r.boxes_by_class.values()) for r in split.images]
    sides = [box_side(box, r.width, r.height) for r in split.images
             for boxes in r.boxes_by_class.values() for box in boxes]
    per_class = {name: sum(len(r.boxes_by_class.get(name, ())) for r in split.images) for name in split.class_names}
    return {
        "source": str(split.source),
        "images": len(split.images),
        "negatives": sum(1 for n in per_image if n == 0),
        "boxes": sum(per_image),
        "classes": len(split.class_names),
        "boxes_per_image": _spread(per_image),
        "box_side_px": _spread(sides),
        "boxes_per_class": per_class,
    }


def box_side(box: tuple[float, ...], width: int, height: int) -> float:
    """A box's size as one number: the side of the square of the same area, in pixels."""
    return ((box[2] - box[0]) * width * (box[3] - box[1]) * height) ** 0.5


def box_warnings(annotations: Annotations, split: DetectionSplit) -> list[str]:
    """Tiny boxes, and boxes the annotations let reach outside the image (kept clipped, or dropped)."""
    sizes = {r.path: (r.width, r.height) for r in split.images}
    outside = 0
    for entry in annotations.images:
        if entry.path not in sizes:
            continue
        width, height = (1.0, 1.0) if annotations.normalized else sizes[entry.path]
        outside += sum(1 for _, (x1, y1, x2, y2) in entry.boxes if min(x1, y1) < 0 or x2 > width or y2 > height)
    tiny = sum(1 for r in split.images for boxes in r.boxes_by_class.values() for b in boxes
               if min((b[2] - b[0]) * r.width, (b[3] - b[1]) * r.height) < TINY_PX)
    found = []
    if tiny:
        found.append(f"{tiny} tiny box(es), under {TINY_PX} px on a side")
    if outside:
        found.append(f"{outside} box(es) reach outside the image (clipped to it)")
    return found


def class_warnings(splits: dict[str, DetectionSplit]) -> list[str]:
    """Classes only one split has: never trained on, or never evaluated."""
    if len(splits) < 2:
        return []
    found = []
    for name, split in splits.items():
        elsewhere = set().union(*(set(s.class_names) for n, s in splits.items() if n != name))
        only = [c for c in split.class_names if c not in elsewhere]
        if only:
            shown = ", ".join(only[:5]) + (f" and {len(only) - 5} more" if len(only) > 5 else "")
            found.append(f"{len(only)} class(es) only in {name}: {shown}")
    return found


def draw_samples(split: DetectionSplit, n: int, seed: int):
    """A contact sheet of `n` images of the split, chosen by `seed`, with their boxes and names."""
    chosen = sorted(random.Random(seed).sample(range(len(split.images)), min(n, len(split.images))))
    records = [split.images[i] for i in chosen]
    pictures = [draw_detections(load_image(r.path), r.boxes_by_class, {}, ground_truth_only=True) for r in records]
    return contact_sheet(pictures, captions=[r.path.name for r in records])


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['dataset']}: {report['format']}"]
    for name, s in report["splits"].items():
        per, side = s["boxes_per_image"], s["box_side_px"]
        lines += [
            f"{name}: {s['images']} images ({s['negatives']} without boxes), {s['boxes']} boxes, "
            f"{s['classes']} classes  [{s['source']}]",
            f"  boxes per image min/median/max {per['min']:g}/{per['median']:g}/{per['max']:g}; "
            f"box side (px, sqrt of area) {side['min']:.1f}/{side['median']:.1f}/{side['max']:.1f}",
        ]
        top = sorted(s["boxes_per_class"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{c} {n}" for c, n in top[:10]) + (f", ... {len(top) - 10} more" if len(top) > 10 else "")
        lines.append(f"  boxes per class: {shown}")
        if "contact_sheet" in s:
            lines.append(f"  samples: {s['contact_sheet']}")
    lines += [f"warning: {w}" for w in report["warnings"]] or ["no warnings"]
    return "\n".join(lines) + "\n"


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):  # `python -m datasets.inspect PATH`
        args = [f"--dataset={args[0]}", *args[1:]]
    run_cli(InspectConfig, main, __doc__.split("\n\n")[0], argv=args)
