"""Fine-tune Moondream so that `detect()` finds your objects: exact teacher forcing on the detect path.

Each training sequence is what `detect()` itself runs, [BOS, image, detect prompt for a class, then
every ground-truth box as the x / y / size embeddings inference would feed back], scored in one
causal forward pass: cross-entropy on every coordinate and size bin where inference reads it, and on
the stop decision (continue after each box, stop after the last; an absent class trains "stop").

    python sft_trainer_detect_grad.py --lr=1e-5 --epochs=5 --use_lora=True --lora_rank=32 --grad_accum_steps=16
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.cli import run_cli
from finetune.sequences import boxes_to_target, build_action_batch, supervised_loss
from finetune.training import FeatureCache, Trainer, TrainConfig, image_groups, load_data, prepare_model


@dataclass
class DetectGradConfig(TrainConfig):
    lr: float = 1e-5
    epochs: int = 5
    grad_accum_steps: int = 16
    batch_size: int = 4


def main(config: DetectGradConfig) -> dict:
    model = prepare_model(config)
    data = load_data(config)
    cache_mode = "off" if config.train_vision else config.feature_cache
    features = FeatureCache(model, cache_mode, Path(config.output_dir) / "feature_cache")

    def make_batches(epoch: int) -> list:
        samples = data.train.samples(config.negatives_per_positive, seed=config.seed + epoch)
        samples = image_groups(samples, seed=config.seed + epoch)
        return [samples[i : i + config.batch_size] for i in range(0, len(samples), config.batch_size)]

    def loss_fn(batch):
        images = {s.image_path: None for s in batch}
        images = {path: features(path) for path in images}  # one encoding per image in the batch
        targets = [boxes_to_target(model.prompt_tokens("detect", s.class_name), s.boxes, model.region) for s in batch]
        return supervised_loss(model, build_action_batch(model, [images[s.image_path] for s in batch], targets,
                                                         feed_dtype=model.dtype))

    trainer = Trainer(config, "detect_grad", model, data, len(make_batches(0)), make_batches, loss_fn,
                      eval_encode=None if cache_mode == "off" else features.encoded)
    return trainer.fit()


if __name__ == "__main__":
    run_cli(DetectGradConfig, main, __doc__.split("\n\n")[0])
