import copy

import numpy as np
import pytest

from finetune.rewards import REWARDS, count_mix_reward, f1_reward, get_reward, iou_match_reward
from moondream2.errors import UserInputError

GT = [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.8, 0.9], [0.6, 0.1, 0.9, 0.3]]


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_identical_perfect_rollouts_all_score_one(name):
    reward = get_reward(name)
    rollouts = [list(GT), list(GT), np.array(GT)]
    assert [reward(r, GT) for r in rollouts] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_empty_cases(name):
    reward = get_reward(name)
    assert reward([], []) == 1.0
    assert reward(GT, []) == 0.0
    assert reward([], GT) == 0.0


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_duplicates_misses_and_extras_lower_the_reward(name):
    reward = get_reward(name)
    perfect = reward(GT, GT)
    assert reward(GT + [GT[0]], GT) < perfect  # a duplicate
    assert reward(GT[:2], GT) < perfect  # a miss
    assert reward(GT + [[0.0, 0.6, 0.2, 0.8]], GT) < perfect  # an extra


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_rewards_are_pure(name):
    reward = get_reward(name)
    pred_list, gt_array = [list(b) for b in GT[:2]] + [[0.0, 0.0, 0.05, 0.05]], np.array(GT)
    pred_before, gt_before = copy.deepcopy(pred_list), gt_array.copy()
    first = reward(pred_list, gt_array)
    assert reward(pred_list, gt_array) == first
    assert pred_list == pred_before and np.array_equal(gt_array, gt_before)


def test_hand_worked_values():
    half = [[0.1, 0.1, 0.3, 0.2]]  # IoU 0.5 with GT[0]
    assert iou_match_reward(half, GT[:1]) == pytest.approx(0.5)
    assert iou_match_reward(GT[:1] + GT[:1], GT[:1]) == pytest.approx(0.5)  # duplicate halves it
    assert f1_reward(half, GT[:1]) == 1.0  # IoU exactly 0.5 counts
    assert f1_reward(GT[:2], GT) == pytest.approx(0.8)
    assert count_mix_reward(half, GT[:1], count_weight=0.25) == pytest.approx(0.75 * 0.5 + 0.25 * 1.0)
    assert count_mix_reward([], GT, count_weight=0.25) == 0.0


def test_unknown_reward_name_lists_valid_ones():
    with pytest.raises(UserInputError, match="iou, f1, count_mix"):
        get_reward("bleu")
