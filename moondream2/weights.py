"""Checkpoint key layouts and weight fetching.

Published Moondream 2 checkpoints come in three layouts; all are converted to our module names
before a (strict) load:
  - module names: `vision.…`, `text.…`, `region.…` (what `state_dict()` saves),
  - the Hugging Face hub layout: the same names under a `model.` prefix,
  - the legacy training layout: `vision_encoder.…`, `text_model.…`, `region_model.…`, with the two
    Fourier matrices stored transposed.
Old fine-tuning checkpoints also carry stale KV-cache buffers; those are dropped.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from .errors import UserInputError

MD2_REPO, MD2_REVISION = "vikhyatk/moondream2", "2025-06-21"

_LEGACY_RULES: list[tuple[str, str]] = [
    (r"^vision_encoder\.encoder\.model\.visual\.patch_embed\.linear\.", "vision.patch_emb."),
    (r"^vision_encoder\.encoder\.model\.visual\.pos_embed$", "vision.pos_emb"),
    (r"^vision_encoder\.encoder\.model\.visual\.blocks\.(\d+)\.norm1\.", r"vision.blocks.\1.ln1."),
    (r"^vision_encoder\.encoder\.model\.visual\.blocks\.(\d+)\.norm2\.", r"vision.blocks.\1.ln2."),
    (r"^vision_encoder\.encoder\.model\.visual\.blocks\.(\d+)\.", r"vision.blocks.\1."),
    (r"^vision_encoder\.encoder\.model\.visual\.norm\.", "vision.post_ln."),
    (r"^vision_encoder\.projection\.mlp\.", "vision.proj_mlp."),
    (r"^text_model\.transformer\.embd\.wte\.weight$", "text.wte"),
    (r"^text_model\.transformer\.h\.(\d+)\.mixer\.Wqkv\.", r"text.blocks.\1.attn.qkv."),
    (r"^text_model\.transformer\.h\.(\d+)\.mixer\.out_proj\.", r"text.blocks.\1.attn.proj."),
    (r"^text_model\.transformer\.h\.(\d+)\.", r"text.blocks.\1."),
    (r"^text_model\.lm_head\.ln\.", "text.post_ln."),
    (r"^text_model\.lm_head\.linear\.", "text.lm_head."),
    (r"^region_model\.coordinate_features\.weight$", "region.coord_features"),
    (r"^region_model\.size_features\.weight$", "region.size_features"),
    (r"^region_model\.coordinate_encoder\.", "region.coord_encoder."),
    (r"^region_model\.coordinate_decoder\.", "region.coord_decoder."),
    (r"^region_model\.", "region."),
]
_LEGACY_TRANSPOSED = {"region.coord_features", "region.size_features"}
_CACHE_KEY = re.compile(r"\.kv_cache\.[kv]_cache$")


def legacy_to_module_name(key: str) -> str:
    for pattern, replacement in _LEGACY_RULES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


def to_module_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any published layout -> our module names (tensors untouched except the legacy transposes)."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("._orig_mod", "")
        if _CACHE_KEY.search(key):
            continue
        if key.startswith("model."):
            key = key[len("model.") :]
        if key.startswith(("vision_encoder.", "text_model.", "region_model.")):
            key = legacy_to_module_name(key)
            if key in _LEGACY_TRANSPOSED:
                value = value.t()
        out[key] = value.contiguous()
    return out


def ensure_weights(path: str | Path, repo: str = MD2_REPO, revision: str | None = MD2_REVISION,
                   filename: str = "model.safetensors") -> Path:
    """Return `path`, downloading the checkpoint from the hub first when the file is missing."""
    path = Path(path)
    if path.is_file():
        return path
    try:
        from huggingface_hub import hf_hub_download

        cached = hf_hub_download(repo, filename, revision=revision)
    except Exception as err:
        where = f"{repo}" + (f" (revision {revision})" if revision else "")
        raise UserInputError(
            f"weights file {path} not found and the download from the Hugging Face hub {where} failed "
            f"({type(err).__name__}); download {filename} from https://huggingface.co/{repo} and place it at {path}"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, path)
    return path


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors (or torch .pt) checkpoint, with a one-line error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"weights file {path} not found: pass --weights=PATH to a .safetensors checkpoint")
    try:
        if path.suffix in (".pt", ".pth", ".bin"):
            return torch.load(path, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as err:
        raise UserInputError(f"weights file {path} could not be read ({type(err).__name__}: {err})") from None
