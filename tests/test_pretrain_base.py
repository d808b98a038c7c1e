"""pretrain_base.py: the auxiliary cell labels by hand, the attention it supervises against the fused
attention, and one tiny run end to end to an exported base."""

import json

import torch
from safetensors.torch import load_file

from moondream2 import MoondreamConfig, MoondreamModel
from finetune.base_model import init_random_weights
from pretrain_base import LOOK_LAYER, PretrainConfig, cell_labels, head_attention, main


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
    assert saved["test"] == card["test"] and saved["test_images"] == 2 and saved["train_images"] == 4 and "python pretrain_base.py" in saved["command"]


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
