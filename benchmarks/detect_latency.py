"""Detect latency: 8 classes of one image as 8 `detect` calls against one batched `detect_batch`.

Both paths return the same greedy boxes (tested in tests/test_model.py); the batched one encodes the
image once and decodes the 8 prompts in lockstep, one forward per step for all of them.

    python benchmarks/detect_latency.py                   # tiny and small presets, CPU
    python benchmarks/detect_latency.py --presets=md2 --device=cuda
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.setup import build_model  # noqa: E402

CLASSES = ["circle", "square", "triangle", "diamond", "star", "ring", "cross", "arrow"]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(presets: str = "tiny,small", device: str = "cpu", max_objects: int = 5, repeats: int = 3,
         out: str = "benchmarks/results/detect_latency.json") -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    settings = {"max_objects": max_objects}
    rows = []
    for preset in str(presets).split(","):
        model = build_model(preset, device=device).eval()
        separate = timed(lambda: [model.detect(image, c, settings) for c in CLASSES], repeats)
        batched = timed(lambda: model.detect_batch([(image, c) for c in CLASSES], settings), repeats)
        rows.append({"preset": preset, "device": device, "classes": len(CLASSES), "separate_s": round(separate, 3),
                     "batched_s": round(batched, 3), "speedup": round(separate / batched, 2)})
        print(rows[-1], flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2))
    print("| preset | 8 x detect (s) | detect_batch of 8 (s) | speedup |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['separate_s']:.3f} | {r['batched_s']:.3f} | {r['speedup']:.1f}x |")


if __name__ == "__main__":
    fire.Fire(main)
