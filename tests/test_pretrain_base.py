"""pretrain_base.py: the auxiliary cell labels by hand, and one tiny run end to end to an exported base."""

import json

import torch
from safetensors.torch import load_file

from moondream2 import MoondreamConfig, MoondreamModel
from pretrain_base import PretrainConfig, cell_labels, main


def test_cell_labels_mark_covered_cell_centres_and_the_cell_holding_a_box_centre():
    boxes = {"a": [(0.0, 0.0, 0.5, 0.5)], "b": [(0.8, 0.8, 0.9, 0.9)]}  # "b" covers no cell centre of a 2x2 grid
    labels = cell_labels(boxes, ["a", "b", "c"], grid=2)
    assert labels.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]  # row-major cells


def test_a_tiny_pretraining_run_exports_a_strict_loading_base_and_its_card(tmp_path):
    out = tmp_path / "base.safetensors"
    card = main(PretrainConfig(output_dir=str(tmp_path), n_train=4, n_valid=2, n_test=2, max_steps=1,
                               eval_interval=100, num_pictures=0, out=str(out)))
    state = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert not any(k.startswith("pretrain_head") for k in state)  # the auxiliary head is not exported
    MoondreamModel(MoondreamConfig.preset("tiny-shapes")).load_state_dict(state)  # strict
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["test"] == card["test"] and saved["test_images"] == 2 and "python pretrain_base.py" in saved["command"]
