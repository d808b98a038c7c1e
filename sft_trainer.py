"""Fast supervised fine-tuning for detection and pointing, teacher-forced from cached image features.

Each sequence is what `detect()` (boxes) or `point()` (box centres) runs: [BOS, image, prompt for a
class, then every target object as the embeddings inference would feed back], with cross-entropy on
every coordinate/size bin and on the stop decision. Image features are computed once per image. As in
the original, --use_lora=False fine-tunes the text decoder and the region head in full. With the text
decoder frozen (--region_only=True: the region head alone) the image prefix's keys/values are cached
as well, so a step runs only the prompt and the objects through the decoder.

    python sft_trainer.py --lr=1e-3 --epochs=20 --use_lora=True --lora_rank=32
    python sft_trainer.py --region_only=True --task=both --hflip_prob=0.5    # region head only: cheapest
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.cli import flag, run_cli
from finetune.config import TrainConfig
from finetune.sequences import TASKS
from finetune.supervised import train_supervised
from moondream2.errors import UserInputError


@dataclass
class SFTConfig(TrainConfig):
    lr: float = 1e-3
    epochs: int = 20
    region_only: bool = flag(False, "train the region head alone (no LoRA, decoder frozen): image prefixes are cached, "
                                    "the cheapest mode")
    task: str = flag("detect", "detect (boxes), point (box centres) or both (each sample picks one at random, seeded)")
    shuffle_objects: bool = flag(False, "teach objects in random order instead of the canonical top-to-bottom order")
    hflip_prob: float = flag(0.0, "probability of mirroring an image (and its boxes) for an epoch; features cached per "
                                  "side")
    prefix_cache_mb: float = flag(2048.0, "memory for cached image-prefix keys/values while the decoder is frozen (0: "
                                          "off)")

    def __post_init__(self):
        if self.region_only:  # before the checks, which then see the settings that will run
            self.use_lora, self.train_text, self.train_region = False, False, True
        super().__post_init__()
        if self.task not in TASKS:
            raise UserInputError(f"--task={self.task}: use one of {', '.join(TASKS)}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise UserInputError(f"--hflip_prob={self.hflip_prob} must be between 0 and 1")
        if self.prefix_cache_mb < 0:
            raise UserInputError(f"--prefix_cache_mb={self.prefix_cache_mb} must be 0 (off) or more")


def main(config: SFTConfig) -> dict:
    return train_supervised(config, "sft", config.task, config.hflip_prob, config.shuffle_objects,
                            config.prefix_cache_mb)


if __name__ == "__main__":
    run_cli(SFTConfig, main, __doc__.split("\n\n")[0])
