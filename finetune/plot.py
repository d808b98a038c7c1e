"""Curves of a run from its JSON-lines log: training loss, learning rate, validation F1 and mAP by step.

    python -m finetune.plot RUN_DIR

draws `curves_{TRAINER}.png` in RUN_DIR for every `log_{TRAINER}.jsonl` there. It works on any run:
finished, still going (a half-written last line is skipped) or stopped. A log that several runs
appended to is read from the last fresh start on; resumed runs continue the one before.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from finetune.files import atomic_write
from moondream2.errors import UserInputError

PANELS = (("train", "loss", "training loss"), ("train", "lr", "learning rate"),
          ("val", "f1", "validation F1"), ("val", "map", "validation mAP"))


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of the latest run in a log: everything after its last fresh (not resumed) start."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a running trainer is writing
            continue
        if record.get("event") == "config" and not record.get("resume"):
            records = []
        records.append(record)
    return records


def series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Panel title -> (steps, values); a later record at the same step (after a resume) wins."""
    out = {}
    for kind, key, title in PANELS:
        points = {}
        for r in records:
            at_kind = r.get("event") == "train" if kind == "train" else r.get("event") == "eval" and r.get("split") == kind
            if at_kind and isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int):
                points[r["step"]] = r[key]
        steps = sorted(points)
        out[title] = (steps, [points[s] for s in steps])
    return out


def plot_log(log: Path, out: Path) -> Path:
    """Four panels of one log, written atomically to `out` (a run may be reading it meanwhile)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (title, (steps, values)) in zip(axes.flat, series(read_log(log)).items()):
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not steps:
            ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes.flat[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    figure.suptitle(log.stem.removeprefix("log_"))
    atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """`curves_{TRAINER}.png` for every trainer log in `run_dir`."""
    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("log_*.jsonl"))
    if not logs:
        raise UserInputError(f"{run_dir}: no log_*.jsonl here; pass a trainer's --output_dir")
    return [plot_log(log, run_dir / f"curves_{log.stem.removeprefix('log_')}.png") for log in logs]


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m finetune.plot RUN_DIR", file=sys.stderr)
        raise SystemExit(2)
    try:
        for path in plot_run(argv[0]):
            print(path)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
