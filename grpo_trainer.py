"""Reinforce Moondream's detections (or points) with GRPO: sample several answers, reward the better ones.

For each (image, class) sample the current policy draws --num_rollouts detections (coordinates, sizes
and the stop decision all sampled); each is scored against every ground-truth box by the built-in
rewards or your own (--reward=my_rewards.py:fn), compared with its group, and the sampled actions are
replayed teacher-forced for a PPO-clipped update with a KL penalty to the starting policy. Start from
a supervised adapter (--init_lora) for a useful signal. The mechanics live in `finetune/grpo.py`.

    python grpo_trainer.py --learning_rate=5e-5 --batch_size=5 --num_rollouts=5 --num_epochs=3
    python grpo_trainer.py --reward=iou --reward=my_rewards.py:small_boxes --reward_weights=1,0.2
"""

from __future__ import annotations

from finetune.cli import run_cli
from finetune.grpo import GRPOConfig, train_grpo


def main(config: GRPOConfig) -> dict:
    return train_grpo(config)


if __name__ == "__main__":
    run_cli(GRPOConfig, main, __doc__.split("\n\n")[0])
