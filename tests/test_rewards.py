"""Rewards: pure, hand-worked values and empty cases; the user's `module:function` is imported and
nothing else runs; a reward that fails stops the run with one line naming it."""

import copy
import math

import numpy as np
import pytest

from finetune.rewards import (
    REWARDS,
    RewardTerm,
    count_mix_reward,
    f1_reward,
    get_reward,
    iou_match_reward,
    point_f1_reward,
    reward_terms,
)
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


# ---- pointing ------------------------------------------------------------------------------------------
def test_point_reward_hand_worked():
    # (0.1, 0.1) sits on GT[0]'s corner (edges count), (0.2, 0.2) is in GT[0] too but the box has
    # already been hit (one hit per box), (0.95, 0.95) is in no box: 1 hit, 3 points, 3 boxes.
    assert point_f1_reward([[0.1, 0.1], [0.2, 0.2], [0.95, 0.95]], GT) == pytest.approx(2 * 1 / (3 + 3))
    # One point per box, each inside: all hit. A point in two overlapping boxes never steals the only
    # box another point could hit (the matching is optimal).
    assert point_f1_reward([[0.2, 0.2], [0.7, 0.8], [0.7, 0.2]], GT) == 1.0
    overlapping = [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2]]
    assert point_f1_reward([[0.1, 0.1], [0.4, 0.4]], overlapping) == 1.0


def test_point_reward_empty_cases():
    assert point_f1_reward([], []) == 1.0
    assert point_f1_reward([[0.5, 0.5]], []) == 0.0
    assert point_f1_reward([], GT) == 0.0


# ---- the user's rewards --------------------------------------------------------------------------------
USER_MODULE = """
import pathlib
MARKS = pathlib.Path(__file__).with_suffix(".marks")
with MARKS.open("a") as f:
    f.write("imported\\n")

def area(pred, gt, image_size):
    with MARKS.open("a") as f:
        f.write("called\\n")
    w, h = image_size
    return sum((b[2] - b[0]) * w * (b[3] - b[1]) * h for b in pred)

def boom(pred, gt, image_size):
    return 1 / 0

def nan(pred, gt, image_size):
    return float("nan")

def text(pred, gt, image_size):
    return "high"

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_MODULE)
    return path


def test_a_file_reward_is_imported_once_and_not_called(user_file):
    fn = get_reward(f"{user_file}:area")
    assert get_reward(f"{user_file}:boom") is not None
    assert user_file.with_suffix(".marks").read_text() == "imported\n"  # one import, no call
    assert fn([[0.0, 0.0, 0.5, 0.5]], GT, (200, 100)) == pytest.approx(100 * 50)


def test_an_importable_module_reward(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert get_reward("my_rewards:area")([[0.0, 0.0, 1.0, 1.0]], [], (4, 3)) == 12


@pytest.mark.parametrize("spec, says", [
    ("{dir}/missing.py:area", "importing {dir}/missing.py failed: FileNotFoundError: no file {dir}/missing.py"),
    ("no_such_module_xyz:area", "importing no_such_module_xyz failed: ModuleNotFoundError"),
    ("{file}:absent", "has no function 'absent'"),
    ("{file}:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
    ("{dir}/broken.py:f", "importing {dir}/broken.py failed: RuntimeError: at import"),
    ("point_f1", "it scores --task=point"),
    ("bleu", "unknown; choose one of iou, f1, count_mix or module:function"),
])
def test_a_reward_that_cannot_load_is_a_one_line_error_naming_it(spec, says, user_file):
    (user_file.parent / "broken.py").write_text("raise RuntimeError('at import')\n")
    spec, says = (x.format(dir=user_file.parent, file=user_file) for x in (spec, says))
    with pytest.raises(UserInputError) as error:
        get_reward(spec)
    message = str(error.value)
    assert message.startswith(f"--reward={spec}: ") and says in message and "\n" not in message


@pytest.mark.parametrize("function, says", [
    ("boom", "raised ZeroDivisionError: division by zero"),
    ("nan", "returned nan: a reward must be a finite number"),
    ("text", "returned 'high', not a number"),
])
def test_a_failing_reward_stops_with_one_line_naming_it(function, says, user_file):
    term = RewardTerm(f"{user_file}:{function}", get_reward(f"{user_file}:{function}"))
    with pytest.raises(UserInputError) as error:
        term(GT, GT, (10, 10))
    assert str(error.value) == f"--reward={user_file}:{function} {says}"


def test_reward_terms_from_lists_commas_and_brackets(user_file):
    for given in (("iou", f"{user_file}:area"), (f"iou,{user_file}:area",), (f"[iou,{user_file}:area]",)):
        terms = reward_terms(given, (1.0, 0.001), "detect")
        assert [t.name for t in terms] == ["iou", f"{user_file}:area"] and [t.weight for t in terms] == [1.0, 0.001]
    assert [(t.name, t.weight) for t in reward_terms(None, None, "detect")] == [("iou", 1.0)]
    assert [(t.name, t.weight) for t in reward_terms(None, None, "point")] == [("point_f1", 1.0)]


@pytest.mark.parametrize("rewards, weights, says", [
    (("iou", "f1"), (1.0,), "1 weights for 2 rewards (iou, f1)"),
    (("iou", "iou"), None, "lists iou twice"),
    (("iou", "f1"), (0.0, 0.0), "every weight is 0"),
    (("iou",), None, "it scores --task=detect"),  # with --task=point
])
def test_reward_flag_errors(rewards, weights, says):
    with pytest.raises(UserInputError) as error:
        reward_terms(rewards, weights, "point" if says.endswith("detect") else "detect")
    assert says in str(error.value) and str(error.value).startswith("--reward")


def test_builtin_rewards_ignore_the_image_size():
    for reward in REWARDS.values():
        assert reward(GT[:2], GT, (10, 10)) == reward(GT[:2], GT, (1000, 50)) == reward(GT[:2], GT)
    assert not math.isnan(point_f1_reward([[0.2, 0.2]], GT, (3, 3)))
