"""Moondream 3 in the trainers: a step of each on tiny-md3, what trains by default, expert adapters."""

import pytest
import torch
from conftest import random_init
from safetensors.torch import load_file

from finetune.checkpoint import read_metadata
from finetune.lora import LoRAExperts, inject_lora_into_model, lora_modules, merge_lora
from finetune.preparation import prepare_model
from grpo_trainer import GRPOConfig
from grpo_trainer import main as grpo_main
from sft_trainer import SFTConfig
from sft_trainer import main as sft_main
from sft_trainer_detect_grad import DetectGradConfig
from sft_trainer_detect_grad import main as detect_grad_main
from moondream2 import MoondreamConfig, MoondreamModel
from moondream2.text import attention_mask

FAST = dict(model="tiny-md3", dataset="synthetic", max_steps=1, eval_interval=100, eval_limit=1, max_objects=2,
            num_pictures=0, lora_rank=4, lora_alpha=8, batch_size=2, grad_accum_steps=1, lr=1e-3)
TRAINERS = {
    "detect_grad": (DetectGradConfig, detect_grad_main, {}),
    "sft": (SFTConfig, sft_main, {"use_lora": True, "task": "both"}),
    "grpo": (GRPOConfig, grpo_main, {"num_rollouts": 2}),
}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_one_step_of_each_trainer_adapts_attention_and_dense_mlps_only(trainer, tmp_path):
    config_class, main, extra = TRAINERS[trainer]
    summary = main(config_class(**FAST, output_dir=str(tmp_path), **extra))
    tensors = load_file(summary["final_path"])
    adapted = {k.rsplit(".", 1)[0] for k in tensors if "lora_" in k}
    # tiny-md3: block 0 is dense, blocks 1-2 are mixture-of-experts
    assert {"text.blocks.0.attn.qkv", "text.blocks.0.attn.proj", "text.blocks.0.mlp.fc1", "text.blocks.0.mlp.fc2",
            "text.blocks.2.attn.qkv", "text.blocks.2.attn.proj"} <= adapted
    assert not any(k.startswith(("text.blocks.1.mlp", "text.blocks.2.mlp")) for k in tensors)  # experts, router
    assert read_metadata(summary["final_path"])["model"] == "tiny-md3"


def test_router_trains_only_when_asked(tmp_path):
    def trained(**flags):
        model = prepare_model(DetectGradConfig(model="tiny-md3", output_dir=str(tmp_path), **flags))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    full_text = trained(use_lora=False)
    assert "text.blocks.0.mlp.fc1.weight" in full_text and "text.blocks.1.mlp.fc1.weight" in full_text
    assert not any(".router." in n for n in full_text)
    assert {"text.blocks.1.mlp.router.weight", "text.blocks.2.mlp.router.bias"} <= trained(train_router=True)
    model = prepare_model(DetectGradConfig(model="tiny-md3", output_dir=str(tmp_path), grad_checkpointing=True))
    assert model.text.gradient_checkpointing


def test_expert_adapters_start_at_the_base_model_and_merge_exactly(md3):
    x = torch.randn(2, 5, md3.config.text.dim, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5).expand(2, -1)
    mask = attention_mask(positions, 5, prefix_len=0)
    with torch.no_grad():
        base = md3.text(x, positions, mask)
        inject_lora_into_model(md3, rank=4, alpha=8, dropout=0.0, expert_adapters=True)
        experts = [m for m in lora_modules(md3) if isinstance(m, LoRAExperts)]
        assert len(experts) == 4  # fc1 and fc2 of the two MoE blocks
        assert torch.equal(md3.text(x, positions, mask), base)  # B = 0
        for m in experts:
            m.lora_B.normal_(0, 0.5)
        adapted = md3.text(x, positions, mask)
        assert not torch.allclose(adapted, base, atol=1e-4)
        merge_lora(md3)
        assert not lora_modules(md3)
        torch.testing.assert_close(md3.text(x, positions, mask), adapted, rtol=1e-4, atol=1e-5)


@pytest.fixture
def md3():
    model = MoondreamModel(MoondreamConfig.preset("tiny-md3"))
    random_init(model, seed=0)
    return model.eval()
