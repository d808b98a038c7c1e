"""What a training run writes to continue and to be used: its checkpoints and its resume file.

- Checkpoints (`save_checkpoint`): a LoRA run's trained tensors, or a full fine-tune's whole model,
  with metadata that rebuilds the model from the file alone (`finetune.inference.load_finetuned`)
  and feeds a model card; named as the original scripts named them (`checkpoint_names`).
- The resume file (`save_resume`, `load_resume`): the trained tensors and optimizer state keyed by
  parameter name, whole, so a run continues on any number of processes; with the schedule, where the
  run stands (`TrainState`), the random streams and the flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune import distributed
from finetune.checkpoint import (
    RESUME_FORMAT,
    full_state_dict,
    load_resume_state,
    rng_state,
    save_resume_state,
    save_weights,
    set_rng_state,
    trained_state_dict,
)
from finetune.config import TrainConfig, flags_dict
from moondream2.errors import UserInputError


@dataclass
class TrainState:
    """Where a run stands: what the loop needs to continue, and the best checkpoint so far."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    items_in_epoch: int = 0  # items of this epoch already folded into an optimizer step (any world size)
    best_metric: float = -math.inf
    best_step: int | None = None
    best_path: str | None = None
    baseline: dict | None = None
    best_metrics: dict | None = None
    evals_without_improvement: int = 0  # for --early_stopping_patience
    extra: dict = field(default_factory=dict)


def checkpoint_names(config: TrainConfig, trainer: str) -> tuple[str, str]:
    """(best-name pattern with {step}, final name), as the original scripts named them."""
    kind = "lora_" if config.use_lora else ""
    return (f"moondream_{kind}best_step_{{step}}_{trainer}.safetensors", f"moondream_{kind}finetune_{trainer}.safetensors")


def checkpoint_metadata(config: TrainConfig, trainer: str, model, state: TrainState, metrics: dict | None) -> dict:
    """What rebuilds the model from the file alone (`load_finetuned`): base, seed of a random init,
    tokenizer and adapter settings; plus what a model card reports: data, flags, validation metrics."""
    lora = getattr(model, "lora_settings", None)
    return {
        "format": "moondream-finetune/1",
        "trainer": trainer,
        "model": config.model,
        "base_weights": config.weights or "default",
        "seed": config.seed,
        "tokenizer": config.tokenizer,
        "complete": not config.use_lora,
        "lora": lora.to_dict() if lora is not None else None,
        "trained": {"lora": config.use_lora, "region": config.train_region, "vision": config.train_vision},
        "step": state.step,
        "dataset": config.dataset,
        "flags": flags_dict(config),
        "metrics": {"val": metrics, "baseline": state.baseline},
    }


def save_checkpoint(model, path: Path, config: TrainConfig, trainer: str, state: TrainState,
                    metrics: dict | None) -> None:
    """A LoRA run writes its trained tensors; a full fine-tune the whole model, which loads strictly
    into a fresh one as the original scripts' checkpoints did."""
    tensors = None if config.use_lora else full_state_dict(model)
    save_weights(model, path, checkpoint_metadata(config, trainer, model, state, metrics), tensors)


def save_resume(path: Path, model, optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
                config: TrainConfig, rng: dict | None = None) -> None:
    """Whole trained tensors and optimizer state keyed by name: resumable on any number of processes.
    Every rank takes part (the tensors are gathered); rank 0 writes. `rng`: the random streams to
    resume with (default: as they are now)."""
    trained = trained_state_dict(model)
    optimizer_state = distributed.optimizer_state(model, optimizer)
    if distributed.process().is_main:
        save_resume_state(path, {
            "format": RESUME_FORMAT,
            "trained": trained,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "state": dataclasses.asdict(state),
            "rng": rng or rng_state(),
            "config": flags_dict(config),
        })
    distributed.barrier()  # nobody reads a checkpoint rank 0 is still writing


def load_resume(path: str, model, optimizer: torch.optim.Optimizer, scheduler) -> TrainState:
    """Trained tensors, optimizer, schedule and random streams as saved; returns where the run stood.
    Refuses a file that trained other parameters than this run, or one of an older format."""
    saved = load_resume_state(path)
    own = dict(model.named_parameters())
    missing = [k for k in saved["trained"] if k not in own or not own[k].requires_grad]
    if missing:
        raise UserInputError(f"--resume={path} trained {missing[0]}, which this run does not train; use the same flags")
    if saved.get("format") != RESUME_FORMAT:
        raise UserInputError(f"--resume={path} was written by an older version of this trainer; start a new run")
    for k, v in saved["trained"].items():
        distributed.copy_whole(own[k], v)
    distributed.load_optimizer_state(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    # The saved learning rate followed the saved run's length; continue on this run's schedule.
    for group, base, rule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * rule(scheduler.last_epoch)
    state = TrainState(**saved["state"])
    set_rng_state(saved["rng"])
    return state
