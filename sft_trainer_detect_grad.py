"""Fine-tune Moondream so that `detect()` finds your objects: exact teacher forcing on the detect path.

Each training sequence is what `detect()` itself runs, [BOS, image, detect prompt for a class, then
every ground-truth box as the x / y / size embeddings inference would feed back], scored in one
causal forward pass: cross-entropy on every coordinate and size bin where inference reads it, and on
the stop decision (continue after each box, stop after the last; an absent class trains "stop").

    python sft_trainer_detect_grad.py --lr=1e-5 --epochs=5 --use_lora=True --lora_rank=32 --grad_accum_steps=16
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.cli import run_cli
from finetune.config import TrainConfig
from finetune.supervised import train_supervised


@dataclass
class DetectGradConfig(TrainConfig):
    lr: float = 1e-5
    epochs: int = 5
    grad_accum_steps: int = 16
    batch_size: int = 4


def main(config: DetectGradConfig) -> dict:
    return train_supervised(config, "detect_grad", task="detect")


if __name__ == "__main__":
    run_cli(DetectGradConfig, main, __doc__.split("\n\n")[0])
