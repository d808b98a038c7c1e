"""LoRA: zero-init start, merge, the notebook loading flow, and strict adapter checks."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.base_model import build_model
from finetune.checkpoint import load_trained_weights, save_weights
from finetune.lora import LoRALinear, adapters_disabled, inject_lora_into_model, merge_lora
from moondream2 import MoondreamConfig, MoondreamModel
from moondream2.errors import UserInputError

IMAGE = Image.new("RGB", (200, 150), (90, 140, 200))


def logits_of(model) -> torch.Tensor:
    torch.manual_seed(0)
    embeds = torch.randn(1, model.config.prefix_len + 4, model.config.text.dim) * 0.1
    with torch.no_grad():
        return model.text.logits(model.hidden_states(embeds))


def perturb_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("region.coord_decoder"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_injection_starts_at_the_base_model_and_wraps_only_targets():
    model = build_model("tiny")
    before = logits_of(model)
    names = inject_lora_into_model(model, rank=4, alpha=8, dropout=0.0, target_modules=["qkv", "fc2"])
    assert names and all(n.endswith(("attn.qkv", "mlp.fc2")) for n in names)
    assert len(names) == 2 * model.config.text.n_layers
    assert not isinstance(model.text.blocks[0].attn.proj, LoRALinear)
    assert torch.equal(logits_of(model), before)


def test_merge_folds_adapters_into_a_plain_strict_checkpoint():
    model = build_model("tiny")
    inject_lora_into_model(model, rank=4, alpha=8, dropout=0.1)
    perturb_adapters(model)
    model.eval()
    adapted = logits_of(model)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(logits_of(model), adapted, atol=1e-5)
    fresh = MoondreamModel(MoondreamConfig.preset("tiny"))
    fresh.load_state_dict(model.state_dict())  # strict
    assert torch.allclose(logits_of(fresh), adapted, atol=1e-5)


def test_adapters_disabled_gives_the_base_model():
    model = build_model("tiny")
    base = logits_of(model)
    inject_lora_into_model(model, rank=4, alpha=8, dropout=0.0)
    perturb_adapters(model)
    assert not torch.allclose(logits_of(model), base)
    with adapters_disabled(model):
        assert torch.equal(logits_of(model), base)


def test_notebook_flow_loads_adapter_checkpoint(tmp_path):
    base_path, adapter_path = tmp_path / "base.safetensors", tmp_path / "adapter.safetensors"
    trained = build_model("tiny", seed=3)
    save_file(trained.state_dict(), str(base_path))
    inject_lora_into_model(trained, rank=8, alpha=16, dropout=0.1)
    perturb_adapters(trained)
    trained.requires_grad_(False)
    for name, p in trained.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("region."))
    save_weights(trained, adapter_path, {"lora": trained.lora_settings.to_dict()})
    trained.eval()

    # What a user writes in a notebook.
    model = MoondreamModel(config=MoondreamConfig.preset("tiny"), setup_caches=True)
    model.load_state_dict(load_file(str(base_path)))
    inject_lora_into_model(model, rank=8, alpha=16, dropout=0.1, target_modules=["qkv", "proj", "fc1", "fc2"])
    missing, unexpected = model.load_state_dict(load_file(str(adapter_path)), strict=False)
    model.eval()
    assert unexpected == []
    assert missing and all("lora_" not in k and not k.startswith("region.") for k in missing)
    assert model.detect(IMAGE, "thing", {"max_objects": 3}) == trained.detect(IMAGE, "thing", {"max_objects": 3})


def test_adapter_with_another_rank_is_an_error(tmp_path):
    model = build_model("tiny")
    inject_lora_into_model(model, rank=8, alpha=16)
    path = save_weights(model, tmp_path / "a.safetensors", {"lora": model.lora_settings.to_dict()},
                        tensors={k: v for k, v in model.state_dict().items() if "lora_" in k})
    other = build_model("tiny")
    inject_lora_into_model(other, rank=4, alpha=8)
    with pytest.raises(UserInputError, match="lora_rank"):
        load_trained_weights(other, path)
    plain = build_model("tiny")
    with pytest.raises(UserInputError, match="inject LoRA"):
        load_trained_weights(plain, path)
