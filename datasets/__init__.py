"""Detection datasets: loading COCO, YOLO, Pascal VOC, CSV, JSONL and parquet alike, image decoding,
and a synthetic toy set."""

from .boxes import Box, canonical_order
from .formats import has_split, load_split
from .images import load_image
from .records import DetectionSample, DetectionSplit, ImageRecord
from .synthetic import SyntheticImage, make_synthetic_split, write_synthetic_coco

__all__ = [
    "Box",
    "DetectionSample",
    "DetectionSplit",
    "ImageRecord",
    "SyntheticImage",
    "canonical_order",
    "has_split",
    "load_image",
    "load_split",
    "make_synthetic_split",
    "write_synthetic_coco",
]
