"""pretrain_base.py: the auxiliary cell labels by hand, the attention it supervises against the fused
attention, and one tiny run end to end to an exported base."""

import json

import torch
from safetensors.torch import load_file

from moondream2 import MoondreamConfig, MoondreamModel
from finetune.base_model import init_random_weights
from pathlib import Path

from finetune.sequences import boxes_to_target, build_action_batch
from finetune.supervised import Example
from pretrain_base import (LOOK_LAYER, PretrainConfig, box_code, cell_labels, head_attention,
                           look_targets, main)


def test_cell_labels_mark_covered_cell_centres_and_the_cell_holding_a_box_centre():
    boxes = {"a": [(0.0, 0.0, 0.5, 0.5)], "b": [(0.8, 0.8, 0.9, 0.9)]}  # "b" covers no cell centre of a 2x2 grid
    labels = cell_labels(boxes, ["a", "b", "c"], grid=2)
    assert labels.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]  # row-major cells


def test_box_code_is_sines_and_cosines_of_centre_and_size():
    code = box_code(torch.tensor([0.0, 0.0, 0.5, 1.0]))  # centre (0.25, 0.5), size (0.5, 1)
    s2 = 2**-0.5
    # value j takes channels 16j..16j+15: 8 sines at pi * 2^k, then 8 cosines
    assert torch.allclose(code[[0, 1, 8, 9]], torch.tensor([s2, 1.0, s2, 0.0]), atol=1e-6)  # x = 0.25
    assert torch.allclose(code[[16, 24, 25]], torch.tensor([1.0, 0.0, -1.0]), atol=1e-6)  # y = 0.5
    assert torch.allclose(code[[32, 40]], torch.tensor([1.0, 0.0]), atol=1e-6)  # w = 0.5
    assert torch.allclose(code[[48, 56, 57]], torch.tensor([0.0, -1.0, 1.0]), atol=1e-6)  # h = 1


def test_look_targets_follow_the_objects_in_order_and_rest_on_bos_to_stop():
    """Two boxes then a stop, and a negative: by hand, the decision/x, y and size reads of object i
    look at box i's cells, and both stops look at BOS only."""
    model = MoondreamModel(MoondreamConfig.preset("tiny"))
    grid, prefix = model.config.vision.grid_size, model.config.prefix_len
    assert grid == 27
    left, right = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
    batch = [Example(Path("a"), "c", "detect", False, (left, right)), Example(Path("a"), "d", "detect", False, ())]
    image = torch.zeros(grid * grid, model.config.text.dim)
    targets = [boxes_to_target(model.prompt_tokens("detect", e.class_name), e.boxes, model.region) for e in batch]
    sequences = build_action_batch(model, [image, image], targets)
    length = sequences.embeds.shape[1]
    reads, cells, boxes, has_object = look_targets(batch, sequences, grid, length)
    first = prefix + len(targets[0].prompt_ids)  # the first object slot of sequence 0
    second = prefix + len(targets[1].prompt_ids)
    expected = {first - 1: left, first + 2: right, first + 5: None,  # decisions (and x reads)
                first: left, first + 3: right,  # y reads (the x slots)
                first + 1: left, first + 4: right,  # size reads (the y slots)
                length + second - 1: None}  # the negative's only decision
    assert sorted(reads.tolist()) == sorted(expected)
    for read, row, read_box, read_any in zip(reads.tolist(), cells, boxes.tolist(), has_object.tolist()):
        box = expected[read]
        assert read_any == (box is not None) and read_box == list(box or (0, 0, 0, 0))
        want = torch.zeros(length, dtype=torch.bool)
        if box is None:
            want[0] = True
        else:
            square = torch.zeros(grid, grid, dtype=torch.bool)
            if box == left:  # cell centres (i + 0.5) / 27 below 0.5: i <= 12
                square[:13, :13] = True
            else:
                square[13:, 13:] = True
            want[1 : 1 + grid * grid] = square.flatten()
        assert torch.equal(row, want), read


def test_a_tiny_pretraining_run_exports_a_strict_loading_base_and_its_card(tmp_path):
    out = tmp_path / "base.safetensors"
    card = main(PretrainConfig(output_dir=str(tmp_path), n_train=4, n_valid=2, n_test=2, max_steps=1,
                               eval_interval=100, num_pictures=0, out=str(out)))
    state = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert not any(k.startswith("pretrain_head") for k in state)  # the auxiliary head is not exported
    MoondreamModel(MoondreamConfig.preset("tiny-shapes")).load_state_dict(state)  # strict
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["test"] == card["test"] and saved["test_images"] == 2 and saved["train_images"] == 4 and "python pretrain_base.py" in saved["command"]
    readable = out.with_suffix(".md").read_text()
    assert saved["command"].strip() in readable and f"{card['test']['f1']:.3f}" in readable


def test_head_attention_gives_the_weights_the_block_really_uses():
    """Oracle: head 0's weights applied to head 0's values equal the fused attention's output for
    that head (the input of the output projection), at every query of a prefix + prompt sequence."""
    torch.manual_seed(0)
    model = MoondreamModel(MoondreamConfig.preset("tiny-shapes"))
    init_random_weights(model, seed=0)
    block = model.text.blocks[LOOK_LAYER]
    seen = {}
    block.register_forward_pre_hook(lambda module, inputs: seen.update(inputs=inputs[:3]))
    block.attn.proj.register_forward_pre_hook(lambda module, inputs: seen.update(heads=inputs[0]))
    embeds = torch.randn(2, model.config.prefix_len + 5, model.config.text.dim)
    model.hidden_states(embeds)
    inputs, positions, mask = seen["inputs"]
    rows, cols = torch.tensor([0, 0, 1, 1]), torch.tensor([3, 145, 146, 149])  # in the prefix and after it
    weights = head_attention(block, inputs, positions, mask, rows, cols).exp()
    head_dim = block.attn.head_dim
    values = block.attn.qkv(block.ln(inputs))[..., -block.attn.n_kv_heads * head_dim:][..., :head_dim]
    expected = seen["heads"][rows, cols, :head_dim]
    assert torch.allclose(torch.einsum("kt,ktd->kd", weights, values[rows]), expected, atol=1e-5)
    assert weights[0, 4:].sum() > 0.1  # a prefix query sees the whole prefix, not only what precedes it
    assert weights[2, 147:].sum() == 0  # a prompt query sees nothing after itself
