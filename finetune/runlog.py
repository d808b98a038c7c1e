"""Run logging: a JSON-lines file always, Weights & Biases (numbers, flags, pictures) only when asked for."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from moondream2.errors import DiskFull, UserInputError, is_disk_full


class RunLog:
    def __init__(self, output_dir: str | Path, name: str, config: dict, use_wandb: bool = False,
                 project: str | None = None, enabled: bool = True, run_name: str | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / f"log_{name}.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise UserInputError("--wandb=True needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=project or "moondream-finetune", name=run_name or name, config=config)
        self.write({"event": "config", **config})

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(_plain(record)) + "\n")
        except OSError as err:
            if is_disk_full(err):
                raise DiskFull(self.path) from None
            raise
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"}
            self.wandb.log(numbers, step=record.get("step"))

    def images(self, key: str, paths: list[Path], step: int) -> None:
        """Pictures already saved to disk, also shown in wandb under `key`."""
        if self.wandb is not None and paths:
            import wandb

            self.wandb.log({key: [wandb.Image(str(p), caption=Path(p).stem) for p in paths]}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value: Any) -> Any:
    """JSON-safe copy (NaN becomes null; paths and tuples become strings and lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
