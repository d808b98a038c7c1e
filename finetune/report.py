"""What a run shows a person: the model-selection score, the one-line validation summary, and the
final report (the metrics table with the starting model beside the trained one, the held-out
pictures side by side, the curves). `Trainer` calls these; they hold no training state."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from finetune.evaluation import EvalResult, save_comparisons, save_pictures
from finetune.run_files import TrainState


def selection_score(metrics: dict) -> float:
    """Model selection: F1 first (the mean of box and point F1 when both are evaluated), mAP to break ties."""
    f1s = [metrics[k] for k in ("f1", "point_f1") if k in metrics]
    m = metrics.get("map")
    return sum(f1s) / len(f1s) + 1e-3 * (m if m is not None and math.isfinite(m) else 0.0)


def validation_line(step: int, metrics: dict, state: TrainState) -> str:
    """`step 250: val f1 0.4100 map 0.2000 (best score 0.4102 at step 250)`."""
    shown = " ".join(f"{k} {_fmt(metrics[k])}" for k in ("f1", "map", "point_f1") if k in metrics)
    where = "the baseline" if state.best_step is None else f"step {state.best_step}"
    return f"step {step}: val {shown} (best score {state.best_metric:.4f} at {where})"


def report_columns(state: TrainState, final_val: dict | None, test: EvalResult | None) -> dict[str, dict]:
    """The final table's columns, left to right: validation at the start, at the best step and at
    the end, then the held-out test split for the starting model and for the weights reported."""
    columns = {}
    if state.baseline:
        columns["baseline"] = state.baseline
    if state.best_metrics:
        columns[f"best@{state.best_step}"] = state.best_metrics
    if final_val is not None:
        columns["final"] = final_val
    if "base_test" in state.extra:
        columns["test(base)"] = state.extra["base_test"]
    if test is not None:
        used = f"best@{state.best_step}" if state.best_path else "final"  # the weights it ran on
        columns[f"test({used})"] = test.metrics
    return columns


def save_result_pictures(result: EvalResult, base_pictures: list[Image.Image], directory: Path) -> list[Path]:
    """Each picture of `result` beside the starting model's of the same image when those were drawn
    (the same first images of the same split), else alone."""
    names = [r["image"] for r in result.predictions[: len(result.pictures)]]
    if base_pictures and len(base_pictures) == len(result.pictures):
        return save_comparisons(base_pictures, result.pictures, names, directory)
    return save_pictures(result.pictures, names, directory)


def _fmt(value) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"
