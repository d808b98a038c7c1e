"""`export.py`'s job: a fine-tuned checkpoint as one complete model, adapters merged into the base,
in one file with a model card, optionally uploaded to the hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.checkpoint import read_metadata, save_weights
from finetune.evaluation import format_metrics_table
from finetune.files import atomic_write
from finetune.inference import load_finetuned
from finetune.lora import merge_lora
from moondream2.errors import UserInputError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = {"plain": "", "hf": "model."}  # key prefix of each layout (see moondream2/weights.py)


def export_checkpoint(config) -> Path:
    """Do what `export.py` does for `config` (an `export.ExportConfig`); returns the model file's path."""
    meta = read_metadata(config.checkpoint)
    state = merged_state_dict(config.checkpoint, DTYPES[config.dtype], config.layout, config.weights)
    out = Path(config.out)
    path = save_weights(None, out / "model.safetensors", {**meta, "layout": config.layout, "dtype": config.dtype,
                                                          "merged_from": Path(config.checkpoint).name}, state)
    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(model_card(meta, config)))
    print(f"wrote {path} ({len(state)} tensors, {config.dtype}, {config.layout} layout) and {out / 'README.md'}")
    if config.push_to_hub:
        push(out, config.push_to_hub)
        print(f"uploaded {out} to https://huggingface.co/{config.push_to_hub}")
    return path


def merged_state_dict(checkpoint: str, dtype: torch.dtype, layout: str, weights: str | None = None) -> dict:
    """The fine-tuned model's complete state dict with every adapter folded into its base weight."""
    model = merge_lora(load_finetuned(checkpoint, weights=weights, device="cpu"))
    prefix = LAYOUTS[layout]
    return {prefix + name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()}


def model_card(meta: dict, config) -> str:
    """README.md for the exported folder: what it is, what it was trained on and how, how well, how to load."""
    metrics = meta.get("metrics") or {}
    columns = {name: m for name, m in (("base", metrics.get("baseline")), ("fine-tuned", metrics.get("val"))) if m}
    flags = "\n".join(f"--{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
                      for k, v in (meta.get("flags") or {}).items())
    load = "MoondreamModel(MoondreamConfig.preset({!r}))".format(meta.get("model", "md2"))
    return "\n".join([
        f"# Moondream fine-tune ({meta.get('trainer', 'unknown trainer')})", "",
        f"- base: `--model={meta.get('model')}`, weights `{meta.get('base_weights')}`",
        f"- data: `{meta.get('dataset')}`",
        f"- training: {meta.get('step')} optimizer steps; LoRA {meta.get('lora') or 'none (full fine-tune)'}, merged",
        f"- export: {config.dtype}, `{config.layout}` key layout, from `{Path(config.checkpoint).name}`", "",
        "## Validation metrics", "",
        "```", format_metrics_table(columns) if columns else "none recorded", "```", "",
        "## Flags", "", "```", flags or "none recorded", "```", "",
        "## Use", "", "```python", "from safetensors.torch import load_file",
        "from moondream2 import MoondreamConfig, MoondreamModel", "",
        f"model = {load}", 'model.load_state_dict(load_file("model.safetensors"))',
        'model.detect(image, "your object")', "```", "",
    ])


def push(folder: Path, repo: str) -> None:
    """Upload the folder; any failure (offline, no login, no access) is one line, and the export stays."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo)
    except Exception as err:
        raise UserInputError(f"--push_to_hub={repo}: upload failed ({type(err).__name__}); the export is kept in "
                             f"{folder}: log in with `hf auth login` and rerun, or upload that folder") from None
