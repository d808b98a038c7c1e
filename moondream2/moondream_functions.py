"""Function-style entry points, for code written against the original `moondream_functions` module."""

from __future__ import annotations

from .moondream import MoondreamModel


def detect(model: MoondreamModel, image, object_str: str, settings: dict | None = None, temperature: float = 0.0):
    """Same as `model.detect`, with the sampling temperature as an argument (0 = greedy)."""
    return model.detect(image, object_str, {**(settings or {}), "temperature": temperature})


def point(model: MoondreamModel, image, object_str: str, settings: dict | None = None, temperature: float = 0.0):
    return model.point(image, object_str, {**(settings or {}), "temperature": temperature})
