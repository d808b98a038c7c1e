"""A fine-tuned model for inference from one checkpoint file: `load_finetuned(path)`, and its base: `load_base(path)`.

Every checkpoint a trainer writes records, in its safetensors metadata, what rebuilds the model: the
base (`--model`, `--weights`, the seed of a random init, the tokenizer) and the LoRA rank, alpha,
targets and expert adapters. So no flag has to be repeated, and a mismatch cannot load quietly.
"""

from __future__ import annotations

from pathlib import Path

from finetune.base_model import build_model
from finetune.checkpoint import load_trained_weights, read_metadata
from finetune.lora import inject_lora_into_model
from moondream2 import MoondreamModel
from moondream2.errors import UserInputError


def load_finetuned(path: str | Path, model: MoondreamModel | None = None, weights: str | None = None,
                   device: str | None = None) -> MoondreamModel:
    """The model `path` was trained into, in eval mode.

    Without `model` it is built from the metadata: a complete checkpoint (a full fine-tune) is itself
    the base, an adapter checkpoint goes on the recorded base (`weights` overrides where that base
    lives, e.g. on another machine). With `model` (a base already built, e.g. to compare with), the
    adapters are injected into it and the tensors loaded.
    """
    meta = _metadata(path)
    if model is None:
        model = _build(meta, str(path) if meta.get("complete") else weights or _recorded_base(meta), device)
        if meta.get("complete"):
            return model.eval()
    lora = meta.get("lora")
    if lora:
        inject_lora_into_model(model, lora["rank"], lora["alpha"], 0.0, lora["target_modules"],
                               lora.get("expert_adapters", False))
    load_trained_weights(model, path)
    return model.eval()


def load_base(path: str | Path, weights: str | None = None, device: str | None = None) -> MoondreamModel:
    """The model `path` was trained from, in eval mode: what its fine-tuned model is compared with.

    Built from the recorded base exactly as `load_finetuned` builds it, so the two differ only by
    what training changed (`weights` overrides where that base lives).
    """
    meta = _metadata(path)
    return _build(meta, weights or _recorded_base(meta), device).eval()


def _metadata(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise UserInputError(f"checkpoint {path} not found: pass a moondream_*.safetensors written by a trainer")
    return read_metadata(path)


def _build(meta: dict, weights: str | None, device: str | None) -> MoondreamModel:
    return build_model(meta.get("model", "md2"), weights, meta.get("tokenizer"), device, meta.get("seed", 0))


def _recorded_base(meta: dict) -> str | None:
    """The base weights file the run used; None: the preset's own (released, shipped or seeded random)."""
    base = meta.get("base_weights")
    return None if base in (None, "default", "random-init") else base
