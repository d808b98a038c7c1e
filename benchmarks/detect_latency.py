"""Detect latency per image against classes per image and images per call: separate `detect` calls
against one `detect_batch`.

A separate call encodes its image and decodes one class; `detect_batch` encodes each distinct image
once and decodes all (image, class) pairs in lockstep, one forward per step for all of them. Both
decode greedily, so they must return the same boxes: every measurement checks it.

    python benchmarks/detect_latency.py                          # tiny and small, 1-16 classes, 1 and 4 images
    python benchmarks/detect_latency.py --classes=8 --images=1 --image_size=640x480
    python benchmarks/detect_latency.py --presets=md2 --device=cuda
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import fire
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    build,
    device_info,
    inference_flops,
    list_arg,
    percent_text,
    throughput,
    timed_runs,
    write_json,
)
from finetune.base_model import pick_device  # noqa: E402
from moondream2.errors import UserInputError  # noqa: E402
from moondream2.image_crops import overlap_crop_image  # noqa: E402

CLASSES = ("circle", "square", "triangle", "diamond", "star", "ring", "cross", "arrow",
           "hexagon", "heart", "moon", "pentagon", "oval", "trapezoid", "crescent", "spiral")
COORDINATES = ("x_min", "y_min", "x_max", "y_max")


def random_images(count: int, size: str) -> list[Image.Image]:
    """`count` different noise images of `size` ("WIDTHxHEIGHT")."""
    width, height = (int(v) for v in str(size).lower().split("x"))
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def same_boxes(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(abs(x[k] - y[k]) <= 1e-6 for x, y in zip(a, b) for k in COORDINATES)


def measure(model, preset: str, images: list[int], classes: list[int], image_size: str, max_objects: int,
            steps: int, warmup: int, max_seconds: float) -> list[dict]:
    """One row per (images, classes): seconds per image of separate calls and of one batched call.

    Every (image, class) pair is timed once per sweep as its own `detect` call, and a row's separate
    time is the sum of the calls it covers: the same calls a loop would make, made once instead of once
    per row.
    """
    if max(classes) > len(CLASSES):
        raise UserInputError(f"at most {len(CLASSES)} classes per image")
    settings = {"max_objects": max_objects}
    pictures = random_images(max(images), image_size)
    names = CLASSES[: max(classes)]
    for _ in range(warmup):
        model.detect_batch([(pictures[0], names[0])], settings)

    calls: dict[tuple[int, int], list[float]] = defaultdict(list)
    separate: dict[tuple[int, int], list[dict]] = {}

    def sweep() -> None:
        for i, image in enumerate(pictures):
            for j, name in enumerate(names):
                start = time.perf_counter()
                separate[i, j] = model.detect(image, name, settings)["objects"]  # lists: the device is done
                calls[i, j].append(time.perf_counter() - start)

    timed_runs(sweep, 0, steps, max_seconds, model.device)
    crops = len(overlap_crop_image(pictures[0], model.config.vision).crops)
    rows = []
    for n_images in images:
        for n_classes in classes:
            pairs = [(i, j) for i in range(n_images) for j in range(n_classes)]
            requests = [(pictures[i], names[j]) for i, j in pairs]
            times, batched = timed_runs(functools.partial(model.detect_batch, requests, settings), 0, steps,
                                        max_seconds, model.device)
            for (i, j), objects in zip(pairs, batched):
                assert same_boxes(objects, separate[i, j]), (
                    f"{preset}: detect_batch and detect disagree on image {i}, class {names[j]!r}: "
                    f"{objects} != {separate[i, j]}")
            batched_s = statistics.median(times)
            separate_s = sum(statistics.median(calls[pair]) for pair in pairs)
            objects = sum(len(o) for o in batched)
            text_tokens = n_images * model.config.prefix_len + 3 * objects + sum(
                len(model.prompt_tokens("detect", names[j])) for _, j in pairs)
            rows.append({
                "preset": preset, "images": n_images, "classes": n_classes, "image_size": image_size,
                "crops_per_image": crops, "objects_per_class": objects / len(pairs), "timed_runs": len(times),
                "separate_s_per_image": separate_s / n_images, "batched_s_per_image": batched_s / n_images,
                "speedup": separate_s / batched_s, "images_per_second": n_images / batched_s,
                "flops_per_call": inference_flops(model, crops * n_images, text_tokens),
            })
            print(f"detect {preset} {n_images} images x {n_classes} classes: {separate_s / n_images:.3f} s/image "
                  f"separate, {batched_s / n_images:.3f} batched", flush=True)
    return rows


def run(presets: list[str], images: list[int], classes: list[int], image_size: str, max_objects: int, device: str,
        steps: int, warmup: int, max_seconds: float, peak_tflops: float | None) -> list[dict]:
    """`measure` for each preset, one model at a time, with the batched call's MFU."""
    rows = []
    for preset in presets:
        model = build(preset, device).eval()
        rows += measure(model, preset, images, classes, image_size, max_objects, steps, warmup, max_seconds)
        cuda = model.device.type == "cuda"
        del model
        if cuda:
            torch.cuda.empty_cache()
    for row in rows:
        row.update(throughput(row["flops_per_call"], row["images"] / row["images_per_second"], peak_tflops))
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| preset | images | classes | separate s/image | batched s/image | speedup | batched images/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['images']} | {r['classes']} | {r['separate_s_per_image']:.3f} | "
                     f"{r['batched_s_per_image']:.3f} | {r['speedup']:.1f}x | {r['images_per_second']:.2f} | "
                     f"{percent_text(r['mfu'])} |")
    return "\n".join(lines)


def main(presets: str = "tiny,small", classes: str = "1,4,8,16", images: str = "1,4", image_size: str = "378x378",
         max_objects: int = 5, device: str | None = None, steps: int = 3, warmup: int = 1, max_seconds: float = 10.0,
         peak_tflops: float | None = None, out: str = "benchmarks/results/detect_latency.json") -> None:
    """Writes the rows to `out` and prints the table. `device`: default the best available.

    steps: timed runs of each measurement at most; fewer once `max_seconds` of timed runs are done.
    """
    chosen = pick_device(device)
    rows = run(list_arg(presets), list_arg(images, int), list_arg(classes, int), image_size, max_objects, str(chosen),
               steps, warmup, max_seconds, device_info(chosen, peak_tflops)["peak_bf16_tflops"])
    write_json(out, rows)
    print(markdown_table(rows))


if __name__ == "__main__":
    fire.Fire(main)
