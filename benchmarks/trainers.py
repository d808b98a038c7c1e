"""Training steps per second of each trainer on the same data (the synthetic shapes set).

Every trainer runs `--max_steps` real optimizer steps through its own recipe; the rate is taken from
the timestamps of its JSON-lines log, so the evaluations before and after the steps are not counted.

    python benchmarks/trainers.py                    # tiny preset, CPU
    python benchmarks/trainers.py --model=small --steps=10
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_trainer import GRPOConfig  # noqa: E402
from grpo_trainer import main as grpo  # noqa: E402
from sft_trainer import SFTConfig  # noqa: E402
from sft_trainer import main as sft  # noqa: E402
from sft_trainer_detect_grad import DetectGradConfig  # noqa: E402
from sft_trainer_detect_grad import main as detect_grad  # noqa: E402

RUNS = {
    "detect_grad (LoRA)": (DetectGradConfig, detect_grad, {}),
    "sft (LoRA)": (SFTConfig, sft, {"use_lora": True}),
    "sft (region head, cached prefixes)": (SFTConfig, sft, {"region_only": True}),
    "grpo (LoRA, 4 rollouts)": (GRPOConfig, grpo, {"num_rollouts": 4}),
}


def steps_per_second(log: Path) -> float:
    times = [json.loads(line)["time"] for line in log.read_text().splitlines() if '"event": "train"' in line]
    return (len(times) - 1) / (times[-1] - times[0])


def main(model: str = "tiny", steps: int = 20, batch_size: int = 4, device: str = "cpu",
         out: str = "benchmarks/results/trainers.json") -> None:
    rows = []
    for label, (config_class, run, extra) in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            config = config_class(model=model, dataset="synthetic", output_dir=tmp, device=device, max_steps=steps,
                                  eval_interval=10**9, eval_limit=1, max_objects=3, num_pictures=0,
                                  batch_size=batch_size, grad_accum_steps=1, lora_rank=8, lora_alpha=16, **extra)
            run(config)
            name = Path(tmp) / next(p.name for p in Path(tmp).glob("log_*.jsonl"))
            rows.append({"trainer": label, "model": model, "device": device, "batch_size": batch_size,
                         "steps_per_second": round(steps_per_second(name), 3)})
        print(rows[-1], flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2))
    base = rows[0]["steps_per_second"]
    print("| trainer | steps/s | vs detect_grad |\n|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['steps_per_second']:.2f} | {r['steps_per_second'] / base:.1f}x |")


if __name__ == "__main__":
    fire.Fire(main)
