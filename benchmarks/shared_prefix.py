"""(image, class) pairs per second of `sft_trainer_detect_grad.py`'s LoRA step: whole sequences against
one prefix per image (`StepPrefixes`), and what else a step could be made of.

A step is one AdamW step on a micro-batch of 12 (image, class) pairs, each with 2 boxes, LoRA rank 16
on the text blocks plus the region head, from cached image features unless said otherwise:

- prefix: 1, 4 or 12 classes per image (12, 3 or 1 images). `whole` runs every pair's [BOS][image
  tokens] prefix (the trainers before the shared prefix); `shared` runs each image's once and its
  classes attend to it (the same loss and gradients: `tests/test_shared_prefix.py`);
- vision: the vision tower trained too, so each image is encoded in the step, against cached features;
- bf16: the step under CPU bfloat16 autocast (float32 master weights, as on CUDA), with the loss of
  each timed step beside float32's (same batch, same start) to show the curves agree;
- compile: `torch.compile` of the text decoder; the first step (the compilation) is reported apart.

On a CPU each row runs in a fresh process, so its peak memory is its own. A step slower than
--max_seconds is timed once, on the first step (medium's whole-sequence steps take minutes on a CPU).

    python benchmarks/shared_prefix.py                         # small and medium, every section
    python benchmarks/shared_prefix.py --presets=small --sections=prefix
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import fire
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PeakMemory, build, in_fresh_process, list_arg, synchronize, write_json  # noqa: E402
from benchmarks.train_step import _trainable, grid_boxes  # noqa: E402
from finetune.base_model import pick_device  # noqa: E402
from finetune.feature_cache import StepPrefixes  # noqa: E402
from finetune.supervised import Example, TeacherForcing  # noqa: E402
from moondream2.errors import UserInputError  # noqa: E402

PAIRS = 12  # (image, class) pairs per micro-batch: 12 images x 1 class ... 1 image x 12 classes
BOXES_PER_PAIR = 2
SECTIONS = ("prefix", "vision", "bf16", "compile")


def _pictures(model, n: int) -> list:
    """n noise images of one crop's size: the vision tower's input when it is in the step."""
    side = model.config.vision.crop_size
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def measure(preset: str, classes: int, mode: str, device: str, steps: int, warmup: int, max_seconds: float,
            vision: bool = False, bf16: bool = False, compile: bool = False) -> dict:
    """One row: median seconds per step, pairs per second, peak memory above the built model's, losses."""
    model = build(preset, device)
    params = _trainable(model, lora=True)  # LoRA rank 16 + region head, as train_step.py's detect_grad step
    if vision:
        model.vision.float().requires_grad_(True)
        params += list(model.vision.parameters())
    n_images = PAIRS // classes
    paths = [Path(f"image{i}") for i in range(n_images)]
    if vision:
        pictures = dict(zip(paths, _pictures(model, n_images)))

        def features(path: Path, hflip: bool = False) -> torch.Tensor:
            return model.image_embeddings(pictures[path])
    else:
        g = torch.Generator().manual_seed(0)
        shape = (model.config.vision.n_patches, model.config.text.dim)
        cached = {p: torch.randn(shape, generator=g).to(model.device, model.dtype) for p in paths}

        def features(path: Path, hflip: bool = False) -> torch.Tensor:
            return cached[path]
    if compile:
        model.text.compile()
    batch = [Example(path, f"class {j}", "detect", False, tuple(grid_boxes(BOXES_PER_PAIR)))
             for path in paths for j in range(classes)]
    loss_fn = TeacherForcing(model, features, StepPrefixes(model, features) if mode == "shared" else None)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if model.device.type == "cuda" or bf16:
        autocast = torch.autocast(model.device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()
    losses: list[float] = []

    def step() -> None:
        with autocast:
            loss, weight, _ = loss_fn(batch)
        (loss * weight).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    memory = PeakMemory(model.device)
    memory.start()
    start = time.perf_counter()
    step()
    synchronize(model.device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    times = [first] if first >= max_seconds and not compile else []  # a minute-long step is timed once
    while not times or (len(times) < steps and sum(times) < max_seconds):
        start = time.perf_counter()
        step()
        synchronize(model.device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"preset": preset, "classes_per_image": classes, "images": n_images, "mode": mode, "vision": vision,
            "bf16": bf16, "compile": compile, "first_step_seconds": first, "timed_steps": len(times),
            "seconds_per_step": seconds, "pairs_per_second": PAIRS / seconds,
            "peak_extra_mib": round(memory.extra_mib(), 1), "losses": losses}


def _row(args: tuple, cuda: bool, vision: bool = False, bf16: bool = False, compile: bool = False) -> dict:
    """`measure(*args, vision, bf16, compile)`, in a process of its own on a CPU."""
    options = (vision, bf16, compile)
    row = measure(*args, *options) if cuda else in_fresh_process("benchmarks.shared_prefix", "measure", *args, *options)
    print(f"{row['preset']} {row['mode']} {row['classes_per_image']} classes/image vision={row['vision']} "
          f"bf16={row['bf16']} compile={row['compile']}: {row['seconds_per_step']:.3f} s/step, "
          f"{row['pairs_per_second']:.2f} pairs/s, peak +{row['peak_extra_mib']:.0f} MiB", flush=True)
    return row


def run(presets: list[str], sections: list[str], device: str, steps: int, warmup: int, max_seconds: float) -> list[dict]:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise UserInputError(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    cuda = device.startswith("cuda")
    rows = []
    for preset in presets:
        timing = (device, steps, warmup, max_seconds)
        if "prefix" in sections:
            for classes in (1, 4, 12):
                whole = _row((preset, classes, "whole", *timing), cuda)
                shared = _row((preset, classes, "shared", *timing), cuda)
                shared["speedup"] = whole["seconds_per_step"] / shared["seconds_per_step"]
                shared["memory_vs_whole"] = shared["peak_extra_mib"] / max(whole["peak_extra_mib"], 1e-9)
                rows += [whole, shared]
        if preset != presets[0]:
            continue  # the other sections on the first preset only
        if "vision" in sections:
            rows.append(_row((preset, 4, "shared", *timing), cuda, vision=True))
        if "bf16" in sections and not cuda:
            fp32 = _row((preset, 4, "shared", *timing), cuda)
            bf16 = _row((preset, 4, "shared", *timing), cuda, bf16=True)
            bf16["speedup"] = fp32["seconds_per_step"] / bf16["seconds_per_step"]
            bf16["fp32_losses"] = fp32["losses"]
            rows += [fp32, bf16]
        if "compile" in sections:
            row = _row((preset, 4, "shared", *timing), cuda, compile=True)
            eager = next((r for r in reversed(rows) if r["preset"] == preset and r["mode"] == "shared"
                          and r["classes_per_image"] == 4 and not (r["vision"] or r["bf16"] or r["compile"])), None)
            if eager:
                row["speedup"] = eager["seconds_per_step"] / row["seconds_per_step"]
            rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| preset | classes/image | step | s/step | pairs/s | speed-up | peak extra MiB | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        what = r["mode"] + "".join(f" + {k}" for k in ("vision", "bf16", "compile") if r[k])
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(f"| {r['preset']} | {r['classes_per_image']} | {what} | {r['seconds_per_step']:.3f} | "
                     f"{r['pairs_per_second']:.2f} | {speedup} | {r['peak_extra_mib']:.0f} | {r['first_step_seconds']:.1f} |")
    return "\n".join(lines)


def main(presets: str = "small,medium", sections: str = ",".join(SECTIONS), device: str | None = None,
         steps: int = 3, warmup: int = 1, max_seconds: float = 20.0,
         out: str = "benchmarks/results/shared_prefix.json") -> None:
    """Writes the rows to `out` and prints the table. Speed-up: against whole sequences (prefix rows),
    float32 (bf16) or eager (compile), at 4 classes per image."""
    chosen = str(pick_device(device))
    rows = run(list_arg(presets), list_arg(sections), chosen, steps, warmup, max_seconds)
    write_json(out, rows)
    print(markdown_table(rows))


if __name__ == "__main__":
    fire.Fire(main)
