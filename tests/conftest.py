"""Shared fixtures: the golden bundle of the original code, and small randomly initialised models.

`random_init(model, seed)` is the one way tests give a model non-trivial weights: `MoondreamModel`
creates some parameters as zeros (`text.wte`, `vision.pos_emb`, the Fourier feature matrices), and a
model with those left at zero hides many bugs (every token embeds the same, the region encoders see
constant features).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(REPO_ROOT))

# Nothing in the test suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moondream2 import MoondreamConfig, MoondreamModel  # noqa: E402
from moondream2.errors import UserInputError  # noqa: E402

GOLDEN_DIR = REPO_ROOT / "tests" / "fixtures" / "golden-md2-tiny"

FOURIER_KEYS = ("region.coord_features", "region.size_features")


def error_of(fn, *args, **kwargs) -> str:
    """The message of the UserInputError `fn(*args, **kwargs)` raises, checked to be one line."""
    with pytest.raises(UserInputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@torch.no_grad()
def random_init(
    model: torch.nn.Module,
    seed: int = 0,
    std: float = 0.02,
    fourier_std: float = 2.0,
    linear_gain: float | None = None,
):
    """Fill every parameter of `model` with reproducible random values; returns the model.

    - LayerNorm weights: 1 + N(0, std); every other parameter (biases included): N(0, std).
    - The Fourier feature matrices (`region.coord_features`, `region.size_features`): N(0, fourier_std),
      as their real values are O(1..10) frequencies, not small weights.
    - `linear_gain`: if given, every other matrix (Linear weights, `text.wte`, `vision.pos_emb`) gets
      N(0, linear_gain / sqrt(fan_in)) instead (embeddings: N(0, linear_gain)). With std 0.02 alone
      the residual stream is so small that the region decoders output little more than their biases:
      every image and prompt then gives the same boxes, which would make equality tests vacuous.
    The values depend only on `seed` and the parameter names and shapes, so two models of the same
    config initialised with the same seed are identical.
    """
    generator = torch.Generator().manual_seed(seed)
    layer_norm_weights = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None
    }
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if any(name == key or name.endswith("." + key) for key in FOURIER_KEYS):
            values = noise * fourier_std
        elif name in layer_norm_weights:
            values = 1.0 + noise * std
        elif linear_gain is not None and name.endswith(("text.wte", "vision.pos_emb")):
            values = noise * linear_gain
        elif linear_gain is not None and param.ndim == 2:
            values = noise * (linear_gain / param.shape[1] ** 0.5)
        else:
            values = noise * std
        param.copy_(values.to(param.dtype))
    return model


def make_tiny_model(seed: int = 0, linear_gain: float | None = 1.0, **kwargs) -> MoondreamModel:
    """A fresh tiny-preset model (builtin tokenizer) with `random_init` weights, in eval mode.

    By default the matrices are fan-in scaled (`linear_gain=1.0`) so that outputs depend on the image
    and the prompt; `linear_gain=None` gives the plain std-0.02 init of the golden bundle.
    """
    torch.manual_seed(seed)
    model = MoondreamModel(config=MoondreamConfig.preset("tiny"), setup_caches=True, **kwargs)
    return random_init(model, seed, linear_gain=linear_gain).eval()


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth-ish random RGB content (noise plus gradients), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255.0 / max(width - 1, 1), yy * 255.0 / max(height - 1, 1),
                     (xx + yy) * 127.0 / max(width + height - 2, 1)], axis=-1)
    noise = rng.normal(0.0, 40.0, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image if mode == "RGB" else image.convert(mode)


@pytest.fixture
def single_thread():
    """One intra-op thread during the test (small tensors, exact comparisons), then the process's own
    count again: a count left at 1 made the later learning tests run at half speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model() -> MoondreamModel:
    """Session-wide tiny model with seeded random weights. Do NOT modify it in a test: use
    `tiny_model_copy` for that."""
    return make_tiny_model(0)


@pytest.fixture
def tiny_model_copy(tiny_model) -> MoondreamModel:
    """A private deep copy of `tiny_model` that a test may change (biases, weights)."""
    return copy.deepcopy(tiny_model)


@pytest.fixture(scope="session")
def test_image() -> Image.Image:
    """A 378x378 image: one global + one local crop, the cheapest input."""
    return random_image(378, 378, seed=1)


@pytest.fixture(scope="session")
def test_image_wide() -> Image.Image:
    """A 640x480 (W x H) image: tiling (2, 4), 9 crops, so the stitching path runs."""
    return random_image(640, 480, seed=2)


@pytest.fixture(scope="session")
def golden_manifest() -> dict:
    return json.loads((GOLDEN_DIR / "manifest.json").read_text())


@pytest.fixture(scope="session")
def golden_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_DIR / "tensors.safetensors"))


@pytest.fixture(scope="session")
def golden_image() -> Image.Image:
    with Image.open(GOLDEN_DIR / "image.png") as image:
        image.load()
        return image.copy()


@pytest.fixture(scope="session")
def golden_model() -> MoondreamModel:
    """The tiny model with the golden bundle's weights (builtin tokenizer)."""
    from safetensors.torch import load_file

    model = MoondreamModel(config=MoondreamConfig.preset("tiny"), setup_caches=True)
    model.load_state_dict(load_file(str(GOLDEN_DIR / "weights.safetensors")))
    return model.eval()
