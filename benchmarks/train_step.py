"""Seconds per training step and peak memory against the number of boxes per image.

One training step = build the teacher-forced sequence for one (image, class) with N boxes, one causal
forward pass, backward, AdamW step (LoRA + region head trainable, frozen vision features cached).
Each (preset, N) runs in a fresh process so the peak-RSS figure belongs to that configuration alone.

    python benchmarks/train_step.py                       # tiny and small presets, CPU
    python benchmarks/train_step.py --presets=tiny --boxes=1,5 --device=cuda
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.lora import inject_lora_into_model  # noqa: E402
from finetune.sequences import boxes_to_target, build_action_batch, supervised_loss  # noqa: E402
from finetune.setup import build_model  # noqa: E402


def grid_boxes(n: int) -> list[tuple[float, float, float, float]]:
    side = max(1, int(n**0.5 + 0.999))
    cell = 1.0 / side
    return [((i % side) * cell, (i // side) * cell, (i % side + 0.8) * cell, (i // side + 0.8) * cell) for i in range(n)]


def measure(preset: str, n_boxes: int, device: str, steps: int, warmup: int) -> dict:
    model = build_model(preset, device=device)
    inject_lora_into_model(model, rank=16, alpha=32, dropout=0.0)
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "lora_" in n or n.startswith("region.")]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    features = torch.randn(model.config.vision.n_patches, model.config.text.dim, device=model.device).to(model.dtype)
    target = boxes_to_target(model.prompt_tokens("detect", "object"), grid_boxes(n_boxes), model.region)
    cuda = model.device.type == "cuda"
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss, _ = supervised_loss(model, build_action_batch(model, [features], [target], feed_dtype=model.dtype))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak_mib = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    params_total = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "params": params_total, "boxes": n_boxes, "device": str(model.device),
            "seconds_per_step": sorted(times)[len(times) // 2], "peak_extra_mib": round(peak_mib, 1)}


def main(presets: str = "tiny,small", boxes: str = "1,5,20,50", device: str = "cpu", steps: int = 5,
         warmup: int = 2, out: str = "benchmarks/results/train_step.json", _one: str | None = None):
    if _one:  # child process: one configuration
        preset, n = _one.split(":")
        print(json.dumps(measure(preset, int(n), device, steps, warmup)))
        return
    rows = []
    for preset in str(presets).split(","):
        for n in str(boxes).split(","):
            cmd = [sys.executable, __file__, f"--_one={preset}:{n}", f"--device={device}", f"--steps={steps}", f"--warmup={warmup}"]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2))
    print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| preset | params | boxes | s/step | vs 1 box | peak extra MiB |", "|---|---|---|---|---|---|"]
    first = {}
    for r in rows:
        first.setdefault(r["preset"], r["seconds_per_step"])
        ratio = r["seconds_per_step"] / first[r["preset"]]
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['boxes']} | {r['seconds_per_step']:.3f} | "
                     f"{ratio:.2f}x | {r['peak_extra_mib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main)
