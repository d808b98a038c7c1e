"""Box conventions shared by the loaders: normalized (x_min, y_min, x_max, y_max) in 0..1."""

import math
from collections.abc import Iterable

Box = tuple[float, float, float, float]


def coco_to_normalized(bbox: list[float], width: float, height: float) -> Box | None:
    """COCO pixel [x, y, w, h] -> normalized xyxy clipped to the image; None if nothing is left.

    Boxes with zero area after clipping (degenerate, negative size, or fully outside) carry no
    target the model could predict, so the caller drops them.
    """
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    x_min, y_min = max(x, 0.0), max(y, 0.0)
    x_max, y_max = min(x + w, width), min(y + h, height)
    if x_max <= x_min or y_max <= y_min:
        return None
    return (x_min / width, y_min / height, x_max / width, y_max / height)


def canonical_order(boxes: Iterable[Box]) -> tuple[Box, ...]:
    """Sort boxes top-to-bottom then left-to-right by center, so a target sequence is unique."""

    def key(box: Box) -> tuple[float, ...]:
        x_min, y_min, x_max, y_max = box
        return ((y_min + y_max) / 2, (x_min + x_max) / 2, *box)

    return tuple(sorted((tuple(b) for b in boxes), key=key))
