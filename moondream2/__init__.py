"""Moondream 2 (and 3) in plain PyTorch: model, weight loading and the inference API."""

from .config import MoondreamConfig, RegionConfig, TextConfig, TextMoeConfig, TokenizerConfig, VisionConfig
from .decoding import EncodedImage
from .errors import UserInputError
from .moondream import MoondreamModel, default_device, default_dtype

__all__ = [
    "EncodedImage",
    "MoondreamConfig",
    "MoondreamModel",
    "RegionConfig",
    "TextConfig",
    "TextMoeConfig",
    "TokenizerConfig",
    "UserInputError",
    "VisionConfig",
    "default_device",
    "default_dtype",
]
