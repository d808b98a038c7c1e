"""Per-rollout rewards for reinforcement learning: the built-in ones and the user's own.

A reward is called as `reward(pred, gt, image_size)`: the rollout's predictions (boxes
(x_min, y_min, x_max, y_max), or (x, y) points for --task=point) and the sample's ground-truth boxes,
all normalised to 0..1, and the image's (width, height) in pixels for rewards that care about absolute
sizes. It returns a float. Every reward scores one rollout against the ground truth on its own, so
identical rollouts get identical rewards (any group normalization belongs to the trainer). They are
pure: inputs are never modified.

The built-ins are in 0..1 and ignore the image size (IoU and hits are scale-free). Empty prediction
and empty ground truth is a perfect 1.0; exactly one of them empty is 0.0.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from scipy.optimize import linear_sum_assignment

from moondream2.errors import UserInputError

from .metrics import BoxesLike, as_boxes, box_iou, match_boxes, match_points, precision_recall_f1

ImageSize = tuple[int, int]
Reward = Callable[[BoxesLike, BoxesLike, ImageSize], float]


def iou_match_reward(pred: BoxesLike, gt: BoxesLike, image_size: ImageSize | None = None) -> float:
    """Total IoU of the best one-to-one matching / max(#pred, #gt).

    Dividing by the larger count makes misses, duplicates and extra boxes all cost reward.
    """
    n_pred, n_gt = len(as_boxes(pred)), len(as_boxes(gt))
    if n_pred == 0 or n_gt == 0:
        return float(n_pred == n_gt)
    iou = box_iou(pred, gt)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum()) / max(n_pred, n_gt)


def f1_reward(pred: BoxesLike, gt: BoxesLike, image_size: ImageSize | None = None, iou_threshold: float = 0.5) -> float:
    """F1 of the optimal matching at `iou_threshold`: rewards getting the count of hits right."""
    n_pred, n_gt = len(as_boxes(pred)), len(as_boxes(gt))
    return precision_recall_f1(len(match_boxes(pred, gt, iou_threshold)), n_pred, n_gt)[2]


def count_mix_reward(pred: BoxesLike, gt: BoxesLike, image_size: ImageSize | None = None,
                     count_weight: float = 0.25) -> float:
    """(1 - w) * iou_match_reward + w * count agreement, for a denser signal on crowded images."""
    n_pred, n_gt = len(as_boxes(pred)), len(as_boxes(gt))
    count_term = 1.0 - abs(n_pred - n_gt) / max(n_pred, n_gt, 1)
    return (1.0 - count_weight) * iou_match_reward(pred, gt) + count_weight * count_term


def point_f1_reward(points: BoxesLike, gt: BoxesLike, image_size: ImageSize | None = None) -> float:
    """F1 of the point hits (`match_points`: a point inside a ground-truth box, one hit per box)."""
    n_points = len(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    return precision_recall_f1(len(match_points(points, gt)), n_points, len(as_boxes(gt)))[2]


# Built-in rewards by task, and the one a run uses when --reward is not given.
REWARDS: dict[str, Reward] = {"iou": iou_match_reward, "f1": f1_reward, "count_mix": count_mix_reward}
POINT_REWARDS: dict[str, Reward] = {"point_f1": point_f1_reward}
BUILTIN = {"detect": REWARDS, "point": POINT_REWARDS}
DEFAULT_REWARD = {"detect": "iou", "point": "point_f1"}


def get_reward(spec: str, task: str = "detect") -> Reward:
    """The reward `spec` names: a built-in of `task`, or `module:function` from the user's code.

    `module` is a .py file path or an importable module name. Nothing runs but that module's import:
    the function is not called here, so a reward that fails shows up at its first rollout.
    """
    if spec in BUILTIN[task]:
        return BUILTIN[task][spec]
    module, sep, function = spec.rpartition(":")
    if not (sep and module and function):
        other = next((t for t, rewards in BUILTIN.items() if spec in rewards), None)
        why = f"it scores --task={other}" if other else "unknown"
        raise UserInputError(f"--reward={spec}: {why}; choose one of {', '.join(BUILTIN[task])} or module:function "
                             "(a .py file or an importable module)")
    try:
        loaded = _import(module)
    except Exception as err:  # the user's module: any failure of its import is theirs to fix
        raise UserInputError(f"--reward={spec}: importing {module} failed: {_one_line(err)}") from None
    fn = getattr(loaded, function, None)
    if not callable(fn):
        raise UserInputError(f"--reward={spec}: {module} has no function {function!r}")
    return fn


def _import(module: str) -> ModuleType:
    """An importable module, or a .py file imported once per process under a name of its own (so two
    files called rewards.py never shadow each other or a real module)."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = Path(module).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no file {module}")
    name = f"user_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # before running it, as `import` does (dataclasses look themselves up)
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[name]
        raise
    return loaded


@dataclass(frozen=True)
class RewardTerm:
    """One --reward of a run: its name as given (in errors and logs), its function, its weight."""

    name: str
    fn: Reward
    weight: float = 1.0

    def __call__(self, pred: BoxesLike, gt: BoxesLike, image_size: ImageSize) -> float:
        """The reward of one rollout. An exception, a non-number or a NaN stops the run with one line
        naming the reward: a rollout's reward is never silently replaced."""
        try:
            value = self.fn(pred, gt, image_size)
        except Exception as err:
            raise UserInputError(f"--reward={self.name} raised {_one_line(err)}") from None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserInputError(f"--reward={self.name} returned {value!r}, not a number") from None
        if not math.isfinite(number):
            raise UserInputError(f"--reward={self.name} returned {number}: a reward must be a finite number")
        return number


def reward_specs(value: tuple[str, ...] | None, task: str) -> list[str]:
    """The --reward names: a list, or comma-separated text ('[a,b]' arrives as text when a name has a
    colon); none given is the task's default."""
    specs = [s.strip(" []") for item in value or () for s in str(item).split(",")]
    return [s for s in specs if s] or [DEFAULT_REWARD[task]]


def reward_terms(value: tuple[str, ...] | None, weights: tuple[float, ...] | None, task: str) -> list[RewardTerm]:
    """--reward and --reward_weights as the run's weighted rewards (weights default to 1 each)."""
    specs = reward_specs(value, task)
    repeated = next((s for s in specs if specs.count(s) > 1), None)
    if repeated:
        raise UserInputError(f"--reward lists {repeated} twice; give it once and set its weight with --reward_weights")
    if weights is not None and len(weights) != len(specs):
        raise UserInputError(f"--reward_weights={list(weights)}: {len(weights)} weights for {len(specs)} rewards "
                             f"({', '.join(specs)}); give one per reward, in the same order")
    if weights is not None and not any(weights):
        raise UserInputError(f"--reward_weights={list(weights)}: every weight is 0, so no rollout would be rewarded")
    return [RewardTerm(s, get_reward(s, task), w) for s, w in zip(specs, weights or [1.0] * len(specs))]


def _one_line(err: BaseException) -> str:
    """`Type: message` on one line, for errors raised by the user's code."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
