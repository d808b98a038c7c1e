"""Seconds per training step and peak memory against boxes per image, for each trainer's step.

A step is one AdamW step on one image with N boxes, from its cached vision features (as the trainers
cache them while vision is frozen), in bf16 autocast on CUDA:

- detect_grad (`sft_trainer_detect_grad.py`): LoRA rank 16 + region head; the whole teacher-forced
  sequence, [BOS][image tokens] prompt and N objects, in one causal pass.
- sft (`sft_trainer.py --region_only=True`): region head only; the image prefix keys/values are cached
  (`PrefixCache`), so a step runs only the prompt and the object slots against them.
- grpo (`grpo_trainer.py`): the policy update alone: replay of 8 rollouts of N boxes each against
  their image's prefix (run once with gradients, as the trainer does), the
  PPO-clipped loss with its KL term on made-up old/reference log-probs and advantages. Sampling the
  rollouts is not in it: that is inference, whose cost `detect_latency.py` measures.

On a CPU each (trainer, preset, N) runs in a fresh process, so its peak memory is its own.

    python benchmarks/train_step.py                                # every trainer, tiny and small
    python benchmarks/train_step.py --trainers=detect_grad --presets=small --device=cuda
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    PeakMemory,
    build,
    dense_params,
    device_info,
    in_fresh_process,
    list_arg,
    percent_text,
    ratio,
    ratio_text,
    throughput,
    timed_runs,
    training_flops,
    write_json,
)
from finetune.base_model import pick_device  # noqa: E402
from finetune.grpo import GRPOConfig  # noqa: E402
from finetune.grpo_loss import ppo_loss, replay_logprobs  # noqa: E402
from finetune.lora import inject_lora_into_model  # noqa: E402
from finetune.sequences import RegionTarget, boxes_to_target, build_action_batch, supervised_loss  # noqa: E402
from moondream2.errors import UserInputError  # noqa: E402

TRAINERS = ("detect_grad", "sft", "grpo")
LORA_RANK = 16
ROLLOUTS = GRPOConfig.num_rollouts


@dataclass
class Step:
    """One optimizer step of a trainer, and how many decoder tokens it runs forward and backward."""

    run: Callable[[], None]
    tokens: int


def grid_boxes(n: int) -> list[tuple[float, float, float, float]]:
    """n boxes on a grid over the image, in the canonical top-to-bottom, left-to-right order."""
    side = max(1, int(n**0.5 + 0.999))
    cell = 1.0 / side
    corners = [((i % side) * cell, (i // side) * cell) for i in range(n)]
    return [(x, y, x + 0.8 * cell, y + 0.8 * cell) for x, y in corners]


def _trainable(model, lora: bool) -> list[torch.nn.Parameter]:
    """Freeze the model, then train the region head (and LoRA adapters) in float32, as `prepare_model` does."""
    if lora:
        torch.manual_seed(0)  # adapter init draws from the global generator
        inject_lora_into_model(model, rank=LORA_RANK, alpha=2 * LORA_RANK, dropout=0.0)
    model.requires_grad_(False)
    params = [p for name, p in model.named_parameters() if "lora_" in name or name.startswith("region.")]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _optimizer_step(model, params: list[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cuda = model.device.type == "cuda"

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def _features(model) -> torch.Tensor:
    """Stand-in for one image's cached vision features, (n_patches, dim)."""
    shape = (model.config.vision.n_patches, model.config.text.dim)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)


def _target(model, boxes: list) -> RegionTarget:
    return boxes_to_target(model.prompt_tokens("detect", "object"), boxes, model.region)


def _suffix_tokens(target: RegionTarget) -> int:
    """Tokens after the image prefix: the prompt and three slots (x, y, size) per object."""
    return len(target.prompt_ids) + 3 * target.n_objects


def detect_grad_step(model, boxes: list) -> Step:
    params = _trainable(model, lora=True)
    features, target = _features(model), _target(model, boxes)

    def loss() -> torch.Tensor:
        return supervised_loss(model, build_action_batch(model, [features], [target], feed_dtype=model.dtype))[0]

    return Step(_optimizer_step(model, params, loss), model.config.prefix_len + _suffix_tokens(target))


def sft_step(model, boxes: list) -> Step:
    params = _trainable(model, lora=False)
    prefix = model.encode_image(_features(model))  # once per image: a `PrefixCache` hit on every later step
    target = _target(model, boxes)

    def loss() -> torch.Tensor:
        return supervised_loss(model, build_action_batch(model, [prefix], [target], feed_dtype=model.dtype))[0]

    return Step(_optimizer_step(model, params, loss), _suffix_tokens(target))


def grpo_step(model, boxes: list) -> Step:
    params = _trainable(model, lora=True)
    features = _features(model)
    targets = [_target(model, boxes) for _ in range(ROLLOUTS)]
    # Replayed actions: x, y, size and "continue" per object, then "stop". The update costs the same
    # whatever the old log-probs and advantages are, so they are made up.
    generator = torch.Generator().manual_seed(0)
    actions = ROLLOUTS * (4 * len(boxes) + 1)
    old, ref = (-torch.rand(actions, generator=generator).to(model.device) for _ in range(2))
    advantages = torch.randn(ROLLOUTS, generator=generator).to(model.device)

    def loss() -> torch.Tensor:
        prefix = model.prefix_kv(features)  # as the trainer: once per image, shared by the group's rollouts
        new, sequence = replay_logprobs(model, [prefix] * ROLLOUTS, targets, GRPOConfig.temperature)
        return ppo_loss(new, old, advantages, sequence, GRPOConfig.clip_eps, ref, GRPOConfig.kl_beta)[0]

    tokens = model.config.prefix_len + ROLLOUTS * _suffix_tokens(targets[0])
    return Step(_optimizer_step(model, params, loss), tokens)


STEPS = {"detect_grad": detect_grad_step, "sft": sft_step, "grpo": grpo_step}


def measure(trainer: str, preset: str, n_boxes: int, device: str, steps: int, warmup: int, max_seconds: float) -> dict:
    """One (trainer, preset, N): median seconds per step, and peak memory above the built model's."""
    model = build(preset, device)
    step = STEPS[trainer](model, grid_boxes(n_boxes))
    memory = PeakMemory(model.device)
    memory.start()
    times, _ = timed_runs(step.run, warmup, steps, max_seconds, model.device)
    return {
        "trainer": trainer, "preset": preset, "params": dense_params(model), "boxes": n_boxes, "tokens": step.tokens,
        "timed_steps": len(times), "seconds_per_step": statistics.median(times),
        "peak_extra_mib": round(memory.extra_mib(), 1), "flops_per_step": training_flops(model, step.tokens),
    }


def check_trainers(trainers: list[str]) -> list[str]:
    unknown = set(trainers) - set(TRAINERS)
    if unknown:
        raise UserInputError(f"unknown trainers {sorted(unknown)}; choose from {', '.join(TRAINERS)}")
    return trainers


def run(trainers: list[str], presets: list[str], boxes: list[int], device: str, steps: int, warmup: int,
        max_seconds: float, peak_tflops: float | None) -> list[dict]:
    """Every (preset, trainer, N), with throughput, MFU, and the ratios to the fewest boxes of the same
    trainer and preset."""
    check_trainers(trainers)
    # A CPU's peak memory is its process's; CUDA's allocator peak resets in place (and CUDA is best kept
    # out of forked processes).
    cuda = device.startswith("cuda")
    rows = []
    for preset in presets:
        for trainer in trainers:
            fewest = None
            for n in sorted(boxes):
                args = (trainer, preset, n, device, steps, warmup, max_seconds)
                row = measure(*args) if cuda else in_fresh_process("benchmarks.train_step", "measure", *args)
                fewest = fewest or row
                seconds = row["seconds_per_step"]
                row.update(
                    images_per_second=1.0 / seconds,
                    **throughput(row["flops_per_step"], seconds, peak_tflops),
                    time_vs_fewest=seconds / fewest["seconds_per_step"],
                    memory_vs_fewest=ratio(row["peak_extra_mib"], fewest["peak_extra_mib"]),
                )
                rows.append(row)
                print(f"train {preset} {trainer} {n} boxes: {seconds:.3f} s/step, "
                      f"peak +{row['peak_extra_mib']:.0f} MiB", flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    fewest = min(r["boxes"] for r in rows)
    vs = f"vs {fewest} box" + ("" if fewest == 1 else "es")
    lines = [f"| trainer | preset | boxes | tokens | s/step | {vs} | peak extra MiB | {vs} | images/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trainer']} | {r['preset']} | {r['boxes']} | {r['tokens']} | {r['seconds_per_step']:.3f} | "
                     f"{r['time_vs_fewest']:.2f}x | {r['peak_extra_mib']:.1f} | {ratio_text(r['memory_vs_fewest'])} | "
                     f"{r['images_per_second']:.2f} | {percent_text(r['mfu'])} |")
    return "\n".join(lines)


def main(trainers: str = ",".join(TRAINERS), presets: str = "tiny,small", boxes: str = "1,5,20,50",
         device: str | None = None, steps: int = 5, warmup: int = 1, max_seconds: float = 10.0,
         peak_tflops: float | None = None, out: str = "benchmarks/results/train_step.json") -> None:
    """Writes the rows to `out` and prints the table. `device`: default the best available.

    steps: timed steps per configuration at most; fewer once `max_seconds` of timed steps have run.
    """
    chosen = pick_device(device)
    rows = run(list_arg(trainers), list_arg(presets), list_arg(boxes, int), str(chosen), steps, warmup, max_seconds,
               device_info(chosen, peak_tflops)["peak_bf16_tflops"])
    write_json(out, rows)
    print(markdown_table(rows))


if __name__ == "__main__":
    fire.Fire(main)
