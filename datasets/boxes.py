"""Box conventions shared by the loaders: normalized (x_min, y_min, x_max, y_max) in 0..1."""

import math
from collections.abc import Iterable

Box = tuple[float, float, float, float]


def to_normalized(box: tuple[float, float, float, float], width: float, height: float) -> Box | None:
    """(x1, y1, x2, y2) in units where the image is `width` x `height` -> normalized xyxy clipped to
    the image; None if nothing is left. Pass width = height = 1 for boxes already normalised.

    Boxes with zero area after clipping (degenerate, inverted, or fully outside) carry no target the
    model could predict, so the caller drops them.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x_min, y_min = max(x1, 0.0), max(y1, 0.0)
    x_max, y_max = min(x2, width), min(y2, height)
    if x_max <= x_min or y_max <= y_min:
        return None
    return (x_min / width, y_min / height, x_max / width, y_max / height)


def canonical_order(boxes: Iterable[Box]) -> tuple[Box, ...]:
    """Sort boxes top-to-bottom then left-to-right by center, so a target sequence is unique."""

    def key(box: Box) -> tuple[float, ...]:
        x_min, y_min, x_max, y_max = box
        return ((y_min + y_max) / 2, (x_min + x_max) / 2, *box)

    return tuple(sorted((tuple(b) for b in boxes), key=key))
