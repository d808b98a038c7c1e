"""The whole performance suite, one command, on the current device.

Writes `{out}/suite_{device}.json` (every measurement) and `{out}/suite_{device}.md` (a report: the
command, versions, device, threads and dtype, then one table per section):

1. training step time and peak memory against boxes per image, for each trainer's step (`train_step.py`);
2. detect latency per image against classes and images per call, separate `detect` calls against one
   `detect_batch` (`detect_latency.py`);
3. model sizes, throughput and MFU; on CUDA the real Moondream 2 size (md2, random weights, bf16,
   nothing downloaded) joins the presets;

and whether the performance targets are met.

    python benchmarks/run_all.py                        # small and medium on this machine's device
    python benchmarks/run_all.py --presets=tiny         # a quick check
    python benchmarks/run_all.py --device=cuda          # + md2, with MFU
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import detect_latency, train_step  # noqa: E402
from benchmarks.common import device_info, list_arg, param_counts, percent_text, write_json  # noqa: E402
from finetune.base_model import pick_device  # noqa: E402

# The targets: step time at 20 boxes within 1.3x of 1 box; peak training memory independent of the
# boxes, read as: at the most boxes within the same 1.3x of 1 box; batched detect of 8 classes on one
# image at least 4x faster than 8 separate calls.
STEP_TIME_BOXES, STEP_TIME_MAX = 20, 1.3
MEMORY_MAX = 1.3
DETECT_CLASSES, DETECT_MIN_SPEEDUP = 8, 4.0

TRAINING_NOTES = """\
One AdamW step on one image with N boxes, from cached image features (float32 trained parameters,
bf16 autocast on CUDA). detect_grad: LoRA rank 16 + region head, the whole teacher-forced sequence
(image prefix, prompt, objects) in one causal pass. sft: region head only, against the cached image
prefix keys/values: a step runs only the prompt and the object slots. grpo: the policy update of a
GRPO step only: replay of 8 rollouts of N boxes each (LoRA rank 16 + region head), PPO-clipped loss
with KL, backward, AdamW. **Rollout sampling is not included in the grpo numbers**: it is the decoding
loop of `detect` (sampled instead of greedy), whose cost section 2 measures. Memory: {memory}."""

DETECT_NOTES = """\
Greedy, at most {max_objects} objects per class, {image_size} noise images ({crops} crops each).
Separate: one `model.detect(image, class)` call per pair, each encoding its image. Batched: one
`model.detect_batch` call for all pairs, one encoding per image; both returned the same boxes (checked
for every pair). Seconds per image = the call(s) for all the image's classes; images/s of the batched
call."""

FLOPS_NOTES = """\
FLOPs: inference 2 x (vision-encoder parameters x crop patches + text-block parameters x text tokens:
image prefix, prompt, 3 slots per object); training 6 x text-block parameters x decoder tokens per step
(the trained path: every trainer's gradient flows back through the text blocks). Embeddings, heads and
attention scores are left out. MFU = achieved FLOP/s / peak dense bf16 FLOP/s of the GPU ({peak});
n/a on a CPU."""


def main(presets: str = "small,medium", trainers: str = ",".join(train_step.TRAINERS), boxes: str = "1,5,20,50",
         classes: str = "1,4,8,16", images: str = "1,4", steps: int = 5, warmup: int = 1, max_seconds: float = 10.0,
         max_objects: int = 5, image_size: str = "378x378", device: str | None = None,
         peak_tflops: float | None = None, out: str = "benchmarks/results") -> None:
    """Run every benchmark and write suite_{device}.json and suite_{device}.md under `out`.

    presets: random-weight model sizes (tiny ~4M, small ~28M, medium ~224M parameters); md2 is added
        on CUDA. trainers: detect_grad, sft, grpo. boxes: boxes per image of the training steps.
    classes, images: classes per image and images per detect call. image_size: WIDTHxHEIGHT.
    steps: timed runs of each measurement at most, after `warmup` untimed ones; fewer once
        `max_seconds` of timed runs are done (always one), so a medium GRPO step is timed once.
    device: default the best available (cuda, mps, cpu). peak_tflops: the GPU's peak dense bf16
        TFLOP/s when it is not in the table.
    """
    started = time.perf_counter()
    chosen = pick_device(device)
    names = list_arg(presets)
    if chosen.type == "cuda" and "md2" not in names:
        names.append("md2")
    trainer_list = train_step.check_trainers(list_arg(trainers))
    box_list, class_list, image_list = list_arg(boxes, int), list_arg(classes, int), list_arg(images, int)
    settings = {
        "presets": ",".join(names), "trainers": ",".join(trainer_list), "boxes": _joined(box_list),
        "classes": _joined(class_list), "images": _joined(image_list), "steps": steps, "warmup": warmup,
        "max_seconds": max_seconds, "max_objects": max_objects, "image_size": image_size, "device": str(chosen),
        **({"peak_tflops": peak_tflops} if peak_tflops else {}), "out": out,
    }
    environment = device_info(chosen, peak_tflops)
    models = [param_counts(name) for name in names]
    for m in models:
        print(f"{m['preset']}: {m['params'] / 1e6:.1f}M parameters (text blocks {m['text_blocks'] / 1e6:.1f}M, "
              f"vision {m['vision'] / 1e6:.1f}M, region head {m['region'] / 1e6:.1f}M)", flush=True)

    peak = environment["peak_bf16_tflops"]
    # Detect first: it asserts that the batched and separate boxes agree, so a failure comes early.
    detect = detect_latency.run(names, image_list, class_list, image_size, max_objects, str(chosen), steps, warmup,
                                max_seconds, peak)
    training = train_step.run(trainer_list, names, box_list, str(chosen), steps, warmup, max_seconds, peak)
    report = {
        "command": _command(settings),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_after": round(os.getloadavg()[0], 2),
        "environment": environment,
        "settings": settings,
        "models": models,
        "training": training,
        "detect": detect,
        "targets": check_targets(training, detect),
    }
    stem = Path(out) / f"suite_{chosen.type}"
    write_json(stem.with_suffix(".json"), report)
    markdown = render(report)
    stem.with_suffix(".md").write_text(markdown)
    print(f"\n{markdown}\nwrote {stem}.json and {stem}.md")


def _joined(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def _command(settings: dict) -> str:
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return threads + "python benchmarks/run_all.py " + " ".join(f"--{k}={v}" for k, v in settings.items())


def check_targets(training: list[dict], detect: list[dict]) -> list[dict]:
    """Each target, for every (preset, trainer) or preset measured at the sizes it names."""
    results = []
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for row in training:
        groups.setdefault((row["preset"], row["trainer"]), {})[row["boxes"]] = row
    for (preset, trainer), by_boxes in groups.items():
        if 1 in by_boxes and STEP_TIME_BOXES in by_boxes:
            ratio = by_boxes[STEP_TIME_BOXES]["seconds_per_step"] / by_boxes[1]["seconds_per_step"]
            results.append({"target": f"step time, {STEP_TIME_BOXES} boxes vs 1", "preset": preset, "trainer": trainer,
                            "bound": f"<= {STEP_TIME_MAX:.2f}x", "measured": ratio, "met": ratio <= STEP_TIME_MAX})
        most = max(by_boxes)
        if 1 in by_boxes and most > 1 and by_boxes[1]["peak_extra_mib"] > 0:
            ratio = by_boxes[most]["peak_extra_mib"] / by_boxes[1]["peak_extra_mib"]
            per_box = (by_boxes[most]["peak_extra_mib"] - by_boxes[1]["peak_extra_mib"]) / (most - 1)
            results.append({"target": f"peak memory, {most} boxes vs 1", "preset": preset, "trainer": trainer,
                            "bound": f"<= {MEMORY_MAX:.2f}x", "measured": ratio, "met": ratio <= MEMORY_MAX,
                            "mib_per_box": per_box})
    for row in detect:
        if row["images"] == 1 and row["classes"] == DETECT_CLASSES:
            results.append({"target": f"detect, {DETECT_CLASSES} classes of 1 image: separate / batched",
                            "preset": row["preset"], "trainer": "-", "bound": f">= {DETECT_MIN_SPEEDUP:.1f}x",
                            "measured": row["speedup"], "met": row["speedup"] >= DETECT_MIN_SPEEDUP})
    return results


def render(report: dict) -> str:
    """The Markdown report."""
    env, settings = report["environment"], report["settings"]
    cuda = env["device"] == "cuda"
    memory = ("torch.cuda.max_memory_allocated above the allocations before the first step" if cuda else
              "peak resident set of a fresh process per row above its size after the model was built and set up")
    peak = f"{env['peak_bf16_tflops']:g} TFLOP/s for {env['device_name']}" if env["peak_bf16_tflops"] else "unknown"
    detect = report["detect"]
    lines = [
        f"# Performance suite: {env['device']}",
        "",
        f"- command: `{report['command']}`",
        f"- torch {env['torch']}, Python {env['python']}",
        f"- device: {env['device']} ({env['device_name']}), {env['threads']} thread(s); load average "
        f"{env['load_average']:g} before and {report['load_average_after']:g} after the run on {env['cpus']} CPUs",
        f"- dtype: {env['dtype']} base weights" + (", float32 trained parameters, bf16 autocast" if cuda else ""),
        f"- timing: median of up to {settings['steps']} timed runs after {settings['warmup']} warm-up, fewer once "
        f"{settings['max_seconds']:g} s of timed runs are done",
        f"- {report['date']}, {report['seconds'] / 60:.1f} minutes in all",
        "",
        "## 1. Training step time and peak memory against boxes per image",
        "",
        TRAINING_NOTES.format(memory=memory),
        "",
        train_step.markdown_table(report["training"]),
        "",
        "## 2. Detect latency per image against classes and images per call",
        "",
        DETECT_NOTES.format(max_objects=settings["max_objects"], image_size=settings["image_size"],
                            crops=detect[0]["crops_per_image"]),
        "",
        detect_latency.markdown_table(detect),
        "",
        "## 3. Models, throughput and MFU",
        "",
        FLOPS_NOTES.format(peak=peak),
        "",
        throughput_table(report),
        "",
        "## Targets",
        "",
        "| target | preset | trainer | bound | measured | met |",
        "|---|---|---|---|---|---|",
        *(f"| {t['target']} | {t['preset']} | {t['trainer']} | {t['bound']} | {t['measured']:.2f}x"
          + (f" ({t['mib_per_box']:+.2f} MiB per box)" if "mib_per_box" in t else "")
          + f" | {'yes' if t['met'] else 'no'} |" for t in report["targets"]),
    ]
    return "\n".join(lines) + "\n"


def throughput_table(report: dict) -> str:
    """Per preset: its size, each trainer's step at the most boxes, and the largest batched detect."""
    lines = ["| preset | params (text blocks / vision) | workload | images/s | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|"]
    for model in report["models"]:
        preset = model["preset"]
        size = f"{model['params'] / 1e6:.1f}M ({model['text_blocks'] / 1e6:.1f}M / {model['vision'] / 1e6:.1f}M)"
        training = [r for r in report["training"] if r["preset"] == preset]
        detect = [r for r in report["detect"] if r["preset"] == preset]
        workloads = []
        for trainer in dict.fromkeys(r["trainer"] for r in training):
            row = max((r for r in training if r["trainer"] == trainer), key=lambda r: r["boxes"])
            workloads.append((f"{trainer} step, {row['boxes']} boxes", row))
        if detect:
            row = max(detect, key=lambda r: (r["images"], r["classes"]))
            workloads.append((f"detect_batch, {row['images']} images x {row['classes']} classes", row))
        for name, row in workloads:
            lines.append(f"| {preset} | {size} | {name} | {row['images_per_second']:.2f} | {row['tflops']:.3f} | "
                         f"{percent_text(row['mfu'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main)
