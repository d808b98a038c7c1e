"""Moondream 2 (and 3) in plain PyTorch: model, weight loading and the inference API.

The names below load on first use, so `moondream2.errors` and `moondream2.pixels` (which the dataset
loaders use) import without torch.
"""

from importlib import import_module

_EXPORTS = {
    "EncodedImage": "decoding",
    "MoondreamConfig": "config",
    "MoondreamModel": "moondream",
    "RegionConfig": "config",
    "TextConfig": "config",
    "TextMoeConfig": "config",
    "TokenizerConfig": "config",
    "UserInputError": "errors",
    "VisionConfig": "config",
    "default_device": "moondream",
    "default_dtype": "moondream",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moondream2' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
