"""Checkpoint writing and reading: the one place files are saved, always atomically.

Two kinds of files:
  - weights (`.safetensors`), with the training settings in the safetensors metadata: a LoRA run's
    hold only the trained tensors (adapters, plus the region head or other parts when they were
    trained) and load into a model with the same adapters injected via `load_state_dict(...,
    strict=False)`; a full fine-tune's hold the complete state dict, which loads strictly into a fresh
    model. `finetune.inference.load_finetuned` builds the model from either.
  - resume state (`resume_*.pt`): trained tensors, optimizer, scheduler, step, data position and RNG,
    as tensors and plain Python values only, so it loads with `weights_only=True`: a crafted file can
    never run code when it is read.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune import distributed
from finetune.files import atomic_write
from moondream2.errors import UserInputError


def trained_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters, whole, on the CPU of rank 0 ({} on the other ranks).

    Under FSDP each one is gathered from its shards in turn (a collective: every rank must call
    this), so no GPU ever holds more than one whole tensor extra.
    """
    main = distributed.process().is_main
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = distributed.whole(p.detach())
            if main:
                state[name] = full.to("cpu")
    return state


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model, whole, on the CPU of rank 0 ({} elsewhere; a collective under FSDP)."""
    main = distributed.process().is_main
    state = {}
    for name, tensor in model.state_dict().items():
        full = distributed.whole(tensor.detach())
        if main:
            state[name] = full.to("cpu")
    return state


def save_weights(model: torch.nn.Module | None, path: str | Path, metadata: dict[str, Any],
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save `tensors` (default: the model's trained parameters) with JSON-encoded metadata.

    Under torchrun every rank calls it (sharded parameters are gathered) and rank 0 writes.
    """
    tensors = trained_state_dict(model) if tensors is None else tensors
    if not distributed.process().is_main:
        return Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:
        raise UserInputError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from None
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_trained_weights(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load an adapter/partial checkpoint into a model prepared the same way; returns its metadata.

    Unlike a bare strict=False load, a tensor the model has no place for, or of the wrong shape (a
    different LoRA rank or target list), is an error.
    """
    from moondream2.weights import load_weights_file

    state = load_weights_file(path)
    own = dict(model.named_parameters())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise UserInputError(
            f"checkpoint {path} holds tensors this model lacks (e.g. {unknown[0]}); inject LoRA with the "
            f"settings it was trained with: {read_metadata(path).get('lora')}"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise UserInputError(
            f"checkpoint {path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model expects "
            f"{tuple(own[wrong[0]].shape)}; was it trained with another --lora_rank or --model?"
        )
    for name, value in state.items():
        distributed.copy_whole(own[name], value)
    return read_metadata(path)


RESUME_FORMAT = "moondream-finetune-resume/3"  # keyed by parameter name; plain values only (weights_only)


def rng_state() -> dict[str, Any]:
    """Every random stream, as tensors and plain values (numpy's key array becomes a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_save(obj: Any, path: str) -> None:
    """`torch.save` through a Python file: given a path, a full disk surfaces as an opaque C++ error
    instead of the OSError (ENOSPC) that `atomic_write` turns into a one-line message."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_resume_state(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: torch_save(state, tmp))


def load_resume_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--resume={path}: file not found; pass a resume_*.pt from an earlier run's output_dir")
    try:
        # weights_only: tensors and plain values only; anything that would import or call code is refused.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserInputError(f"--resume={path} holds Python objects other than tensors and plain values, which "
                             "are refused for safety (it may run code); pass a resume_*.pt written by this "
                             "version") from None
    except Exception as err:
        raise UserInputError(f"--resume={path} could not be read ({type(err).__name__}); is it a resume_*.pt file?") from None
