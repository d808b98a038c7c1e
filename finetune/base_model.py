"""The base model a run starts from, built the same way in every script.

`build_model(preset, weights)` is the one way in: the preset's architecture (`MoondreamConfig.preset`),
its weights (a file given with --weights, else the released checkpoint of `moondream2.weights.CHECKPOINTS`,
downloaded once, else the checkpoint this project ships in git, else a deterministic random init), on
the chosen device, in bfloat16 on CUDA and float32 elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from finetune import distributed
from moondream2 import MoondreamConfig, MoondreamModel, default_device
from moondream2.errors import UserInputError
from moondream2.weights import CHECKPOINTS, ensure_weights, load_weights_file

MODEL_CHOICES = ("md2", "md3", "tiny", "tiny-shapes", "tiny-md3", "small", "medium")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Base models this project trains itself and ships in git: they load offline, with no download.
SHIPPED_WEIGHTS = {"tiny-shapes": PROJECT_ROOT / "models" / "tiny-shapes.safetensors"}
RANDOM_INIT = "random"  # --weights=random: start from a deterministic random init (pretraining)

OFFLINE_HINT = "to try the scripts offline use --model=tiny (random weights: the pipeline runs, nothing is detected)"


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"--device={device} is not a device; use cuda, mps or cpu") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device=cuda but no CUDA GPU is visible; use --device=cpu")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError("--device=mps but MPS is not available; use --device=cpu")
    return chosen


def init_random_weights(model: nn.Module, seed: int = 0) -> None:
    """Deterministic random init for presets without released weights, scaled to train from scratch.

    Matrices get N(0, 1/fan_in), which keeps activations O(1) through the layers (a flat std 0.02
    leaves a tiny model's residual stream so small that every image gives the same boxes, and
    training barely sees the image); token embeddings N(0, 1), biases 0, LayerNorms 1 and 0, Fourier
    features N(0, 1). Patch position embeddings start as 2-D sines and cosines of the patch's column
    and row (`grid_positions`): a model trained from scratch can read where a patch is from its first
    step, where random ones left x untouched for a thousand steps of pretraining.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.LayerNorm):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("_features") or name == "text.wte":
                p.copy_(noise)
            elif name == "vision.pos_emb":
                p.copy_(grid_positions(model.config.vision.grid_size, p.shape[-1]).unsqueeze(0))
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            else:
                p.zero_()


def default_weights(model: str) -> Path:
    """The released checkpoint of `model`, downloaded once; offline, the error also names the presets
    that need no download, so a first run without network is one flag away."""
    released = CHECKPOINTS[model]
    try:
        with distributed.main_first():  # one download, not one per process
            return ensure_weights(released.local_path, released)
    except UserInputError as err:
        raise UserInputError(f"{err}; {OFFLINE_HINT}") from None


def grid_positions(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) row-major patch positions: half the channels encode the column, half the row,
    each as sin/cos pairs at frequencies from one period per grid to one per two patches."""
    quarter = dim // 4
    frequencies = torch.pi * torch.logspace(math.log10(2 / grid), 0, quarter)
    index = torch.arange(grid, dtype=torch.float32)
    row, col = torch.meshgrid(index, index, indexing="ij")
    angles = [c.reshape(-1, 1) * frequencies for c in (col, row)]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=-1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[-1]))


def build_model(
    model: str = "md2", weights: str | None = None, tokenizer: str | None = None, device: str | None = None,
    seed: int = 0,
) -> MoondreamModel:
    """A ready model on its device: base weights in bfloat16 on CUDA, float32 elsewhere.

    Weights come from `weights`, else the preset's released or shipped file, else a random init
    (`--weights=random` forces that, for pretraining a preset from scratch).
    """
    if model not in MODEL_CHOICES:
        raise UserInputError(f"--model={model} is not a model; choose one of {', '.join(MODEL_CHOICES)}")
    if weights is None and model in CHECKPOINTS:  # before building: a missing file fails in a second
        weights = str(default_weights(model))
    config = MoondreamConfig.preset(model)
    if tokenizer:
        config.tokenizer.source = tokenizer
    net = MoondreamModel(config)
    if weights is None and model in SHIPPED_WEIGHTS:
        weights = str(SHIPPED_WEIGHTS[model])
        if not Path(weights).is_file():
            raise UserInputError(f"--model={model}: shipped weights {weights} are missing; restore them with "
                                 f"`git checkout -- models/` or rebuild them with `python pretrain_base.py`")
    if weights is not None and weights != RANDOM_INIT:
        state = load_weights_file(weights)
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise UserInputError(f"weights file {weights} does not fit --model={model}: {first}") from None
    else:
        init_random_weights(net, seed)
    target = distributed.local_device(pick_device(device))
    return net.to(device=target, dtype=torch.bfloat16 if target.type == "cuda" else torch.float32)
