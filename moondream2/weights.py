"""Checkpoint key layouts and weight fetching.

Published Moondream 2 checkpoints come in three layouts; all are converted to our module names
before a (strict) load:
  - module names: `vision.…`, `text.…`, `region.…` (what `state_dict()` saves),
  - the Hugging Face hub layout: the same names under a `model.` prefix,
  - the legacy training layout: `vision_encoder.…`, `text_model.…`, `region_model.…`, with the two
    Fourier matrices stored transposed.
Moondream 3 (bf16) uses the first two, with no renames: the preview's 660 tensors, or 662 in newer
revisions that add `region.ln.{weight,bias}`. Its hub copy is sharded; `ensure_weights` merges the
shards into one file. Its FP8 `model_fp8.pt` (internal names, quantised experts) is not supported.
Old fine-tuning checkpoints also carry stale KV-cache buffers; those are dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DiskFull, UserInputError, is_disk_full

MD2_REPO, MD2_REVISION = "vikhyatk/moondream2", "2025-06-21"
MD3_REPO = "moondream/moondream3-preview"


@dataclass(frozen=True)
class HubCheckpoint:
    """Where a released checkpoint lives on the hub, and where this project keeps its local copy."""

    repo: str
    revision: str | None
    filename: str  # one .safetensors file, or the .index.json of a sharded checkpoint
    local_path: Path


CHECKPOINTS = {
    "md2": HubCheckpoint(MD2_REPO, MD2_REVISION, "model.safetensors", Path("moondream2/model.safetensors")),
    "md3": HubCheckpoint(MD3_REPO, None, "model.safetensors.index.json", Path("models/model_md3.safetensors")),
}


def default_weights_path(preset: str) -> Path | None:
    """The local checkpoint of a released preset ("md2", "md3"); None for random-init presets."""
    checkpoint = CHECKPOINTS.get(preset)
    return checkpoint.local_path if checkpoint else None

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
    if any(".moe_quant." in key for key in state_dict):
        raise UserInputError(
            "this is Moondream 3's FP8 checkpoint (model_fp8.pt), which is not supported; "
            f"use the bf16 safetensors from https://huggingface.co/{MD3_REPO}"
        )
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


def ensure_weights(path: str | Path, checkpoint: HubCheckpoint = CHECKPOINTS["md2"]) -> Path:
    """Return `path`, first downloading `checkpoint` (a preset's entry of `CHECKPOINTS`) from the hub
    when nothing is there; a sharded checkpoint's index makes every shard download and merge into
    the one file at `path`.
    """
    path = Path(path)
    if path.exists():
        return path
    repo, revision, filename = checkpoint.repo, checkpoint.revision, checkpoint.filename
    sharded = filename.endswith(".index.json")
    try:
        def download(name: str) -> Path:
            return _fetch(repo, name, revision)

        if sharded:
            index = json.loads(download(filename).read_text())
            files = [download(name) for name in sorted(set(index["weight_map"].values()))]
        else:
            files = [download(filename)]
    except Exception as err:
        where = repo + (f" (revision {revision})" if revision else "")
        fix = _download_hint(path, repo, revision, filename)
        raise UserInputError(
            f"weights file {path} not found and the download from the Hugging Face hub {where} failed "
            f"({type(err).__name__}); {fix}"
        ) from None
    for file in files:
        check_download(file)
    # Written under a temporary name and renamed once whole: an interrupted copy, a full disk or a
    # short write never leaves a file at `path`, which the next run would take as the weights.
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if sharded:
            merge_safetensors(files, partial)
        else:
            shutil.copyfile(files[0], partial)
        problem = safetensors_size_problem(partial)
        if problem:
            raise UserInputError(f"writing {path} from the download gave a short file ({problem}); run again")
        partial.replace(path)
    except OSError as err:
        if is_disk_full(err):
            raise DiskFull(path) from None
        raise
    finally:
        partial.unlink(missing_ok=True)
    return path


def check_download(file: Path) -> None:
    """Refuse a truncated or corrupt download before it is copied to where the weights are looked for.

    A safetensors file must be as long as its header says; a hub LFS file must also have the SHA-256
    that names its blob in the hub cache (when the cached file is a link to that blob).
    """
    problem = safetensors_size_problem(file)
    blob = file.resolve()
    if problem is None and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        digest = hashlib.sha256()
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != blob.name:
            problem = f"SHA-256 {digest.hexdigest()[:12]}..., not the hub's {blob.name[:12]}..."
    if problem:
        raise UserInputError(f"the downloaded {file} is corrupt ({problem}); delete {blob} and run again to "
                             "download it anew")


def safetensors_size_problem(path: Path) -> str | None:
    """What is wrong with the length of safetensors file `path`, or None when it is what its header
    says (8 bytes of header length, the JSON header, then the tensors' data up to the last offset)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size > size - 8:
                return f"{size} bytes, less than its {header_size}-byte header"
            header = json.loads(f.read(header_size))
        end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"no readable safetensors header: {type(err).__name__}"
    expected = 8 + header_size + end
    return None if size == expected else f"{size} bytes where its header needs {expected}"


def _fetch(repo: str, filename: str, revision: str | None) -> Path:
    """One file from the local hub cache, else from the hub after a single probe: without a network
    the hub client would retry for about half a minute, printing a warning per attempt."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
    except Exception:
        get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=10)
    return Path(hf_hub_download(repo, filename, revision=revision))


def _download_hint(path: Path, repo: str, revision: str | None, filename: str) -> str:
    """The command that puts the checkpoint where the scripts look for it, to run where there is network."""
    pinned = f" --revision {revision}" if revision else ""
    if filename.endswith(".index.json"):
        folder = path.with_suffix("")
        return (f"get its shards with `hf download {repo}{pinned} --include '*.safetensors' --local-dir {folder}` "
                f"(accept the licence at https://huggingface.co/{repo} and `hf auth login` first if it is gated) "
                f"and pass --weights={folder}, or place one merged file at {path}")
    fetched = f"`hf download {repo} {filename}{pinned} --local-dir {path.parent}`"
    if path.name == filename:
        return f"download it with {fetched}, which writes {path}"
    return f"download it with {fetched} and rename {path.parent / filename} to {path}"


def merge_safetensors(shards: list[Path], out: Path, strip_prefix: str = "model.") -> None:
    """Concatenate safetensors shards into one file, byte for byte, without loading the tensors
    (written in place: `ensure_weights` gives it a temporary path).

    The hub prefix is dropped, so the result holds the plain module names the original trainers load.
    """
    entries, sources, offset = {}, [], 0
    for shard in shards:
        with open(shard, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            entries[name.removeprefix(strip_prefix)] = {
                "dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + end - begin]
            }
            sources.append((shard, 8 + size + begin, end - begin))
            offset += end - begin
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
    with open(out, "wb") as dst:
        dst.write(len(header).to_bytes(8, "little") + header)
        for shard, start, length in sources:
            with open(shard, "rb") as src:
                src.seek(start)
                while length:
                    chunk = src.read(min(length, 1 << 26))
                    if not chunk:
                        raise UserInputError(f"shard {shard} is shorter than its header says; delete it and run again")
                    dst.write(chunk)
                    length -= len(chunk)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors (or torch .pt) checkpoint, with a one-line error for bad files."""
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint: every .safetensors file in the folder
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise UserInputError(f"folder {path} holds no .safetensors files: pass --weights=PATH to a checkpoint")
        return {key: value for shard in shards for key, value in load_weights_file(shard).items()}
    if not path.is_file():
        raise UserInputError(f"weights file {path} not found: pass --weights=PATH to a .safetensors checkpoint")
    try:
        if path.suffix in (".pt", ".pth", ".bin"):
            return torch.load(path, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as err:
        raise UserInputError(f"weights file {path} could not be read ({type(err).__name__}: {err})") from None
