"""Per-rollout rewards for reinforcement learning on detection, each in 0..1.

Every reward scores one rollout against the ground truth on its own, so identical rollouts get
identical rewards (any group normalization belongs to the trainer). They are pure: inputs are
never modified. Empty prediction and empty ground truth is a perfect 1.0; exactly one of them
empty is 0.0.
"""

from collections.abc import Callable

from scipy.optimize import linear_sum_assignment

from moondream2.errors import UserInputError

from .metrics import BoxesLike, as_boxes, box_iou, match_boxes

Reward = Callable[[BoxesLike, BoxesLike], float]


def iou_match_reward(pred: BoxesLike, gt: BoxesLike) -> float:
    """Total IoU of the best one-to-one matching / max(#pred, #gt).

    Dividing by the larger count makes misses, duplicates and extra boxes all cost reward.
    """
    n_pred, n_gt = len(as_boxes(pred)), len(as_boxes(gt))
    if n_pred == 0 or n_gt == 0:
        return float(n_pred == n_gt)
    iou = box_iou(pred, gt)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum()) / max(n_pred, n_gt)


def f1_reward(pred: BoxesLike, gt: BoxesLike, iou_threshold: float = 0.5) -> float:
    """F1 of the optimal matching at `iou_threshold`: rewards getting the count of hits right."""
    n_pred, n_gt = len(as_boxes(pred)), len(as_boxes(gt))
    if n_pred + n_gt == 0:
        return 1.0
    return 2 * len(match_boxes(pred, gt, iou_threshold)) / (n_pred + n_gt)


def count_mix_reward(pred: BoxesLike, gt: BoxesLike, count_weight: float = 0.25) -> float:
    """(1 - w) * iou_match_reward + w * count agreement, for a denser signal on crowded images."""
    n_pred, n_gt = len(as_boxes(pred)), len(as_boxes(gt))
    count_term = 1.0 - abs(n_pred - n_gt) / max(n_pred, n_gt, 1)
    return (1.0 - count_weight) * iou_match_reward(pred, gt) + count_weight * count_term


REWARDS: dict[str, Reward] = {"iou": iou_match_reward, "f1": f1_reward, "count_mix": count_mix_reward}


def get_reward(name: str) -> Reward:
    """The reward function called `name` (the --reward flag)."""
    if name not in REWARDS:
        raise UserInputError(f"--reward: unknown reward '{name}'; choose one of {', '.join(REWARDS)}")
    return REWARDS[name]
