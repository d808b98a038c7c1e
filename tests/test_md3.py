"""Moondream 3 in the `moondream2` package: presets, MoE, tau, key layouts, checkpointing, stop decision."""

import copy
import json
import math

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image, random_init
from safetensors.torch import load_file, save_file

from finetune.grpo_loss import replay_logprobs, trace_targets
from finetune.sequences import DECISION, action_logprobs, build_action_batch
from moondream2 import MoondreamConfig, MoondreamModel, TextMoeConfig, UserInputError
from moondream2.decoding import run_region_loop
from moondream2.moe import MoeMLP
from moondream2.rope import apply_rope
from moondream2.text import KVCache, TextAttention, attention_mask
from moondream2.weights import CHECKPOINTS, MD3_REPO, default_weights_path, ensure_weights, load_weights_file


def make_md3(seed: int = 0) -> MoondreamModel:
    torch.manual_seed(seed)
    return random_init(MoondreamModel(MoondreamConfig.preset("tiny-md3")), seed).eval()


@pytest.fixture(scope="module")
def md3() -> MoondreamModel:
    return make_md3(0)


def plain_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- presets ---------------------------------------------------------------------------------------
def test_md3_preset_matches_the_released_checkpoint():
    with torch.device("meta"):
        model = MoondreamModel(MoondreamConfig.preset("md3"))
    state = model.state_dict()
    assert len(state) == 660
    assert sum(p.numel() for p in model.parameters()) == 9_268_622_832
    region = sum(v.numel() for k, v in state.items() if k.startswith("region."))
    assert region == 7_872_128
    assert state["text.blocks.4.mlp.router.weight"].shape == (64, 2048)
    assert state["text.blocks.4.mlp.router.bias"].shape == (64,)
    assert state["text.blocks.23.mlp.fc1.weight"].shape == (64, 2048, 2048)
    assert state["text.blocks.23.mlp.fc2.weight"].shape == (64, 2048, 1024)
    assert state["text.blocks.3.mlp.fc1.bias"].shape == (8192,)
    assert "text.blocks.4.mlp.fc1.bias" not in state
    assert state["text.blocks.0.attn.tau.wq"].shape == (32, 6144)
    assert state["text.blocks.0.attn.tau.alpha"].shape == (32,)
    assert state["region.coord_decoder.weight"].shape == (1024, 2048)
    assert state["region.size_decoder.weight"].shape == (2048, 2048)
    c = model.config
    assert (c.text.rope_theta, c.text.max_context, c.max_objects, c.top_p) == (1.5e6, 4096, 150, 0.9)
    assert c.restrict_stop_decision and not c.repeat_answer_marker
    assert c.tokenizer.source == "moondream/starmie-v1"


def test_tiny_md3_has_dense_then_moe_blocks(md3):
    kinds = [type(block.mlp).__name__ for block in md3.text.blocks]
    assert kinds == ["MLP", "MoeMLP", "MoeMLP"]
    assert all(hasattr(block.attn, "tau") for block in md3.text.blocks)
    assert isinstance(md3.text.blocks[1].mlp.router, torch.nn.Linear)


# ---- mixture of experts ------------------------------------------------------------------------------
def naive_moe(moe: MoeMLP, x: torch.Tensor) -> torch.Tensor:
    """Token by token: full softmax over the router, keep the top-k, renormalise, sum the experts."""
    out = torch.zeros_like(x)
    flat, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for n, token in enumerate(flat):
        probs = moe.router(token).softmax(-1)
        top, experts = probs.topk(moe.top_k)
        for w, e in zip(top / top.sum(), experts.tolist()):
            up = moe.fc1.weight[e] @ token
            a, g = up[: up.shape[0] // 2], up[up.shape[0] // 2 :]
            flat_out[n] += w * (moe.fc2.weight[e] @ (F.gelu(a) * (g + 1)))
    return out


@pytest.mark.parametrize("shape", [(1, 9), (4, 1), (3, 5)])  # sequence, batched decode, batch of sequences
def test_grouped_moe_equals_per_token_reference(shape):
    torch.manual_seed(0)
    moe = MoeMLP(32, TextMoeConfig(num_experts=6, experts_per_token=3, expert_inner_dim=16))
    x = torch.randn(*shape, 32)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), rtol=1e-5, atol=1e-6)


def test_moe_gradients_reach_router_and_only_used_experts():
    torch.manual_seed(0)
    moe = MoeMLP(16, TextMoeConfig(num_experts=8, experts_per_token=2, expert_inner_dim=8))
    x = torch.randn(1, 2, 16, requires_grad=True)
    moe(x).square().sum().backward()
    reference = copy.deepcopy(moe)
    x_ref = x.detach().clone().requires_grad_()
    naive_moe(reference, x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(moe.router.weight.grad, reference.router.weight.grad)
    torch.testing.assert_close(moe.fc1.weight.grad, reference.fc1.weight.grad)
    used = set(moe.route(x.detach().view(-1, 16))[0].flatten().tolist())
    for e in range(8):
        assert (moe.fc2.weight.grad[e].abs().sum() > 0) == (e in used)


# ---- tau ---------------------------------------------------------------------------------------------
def test_zero_tau_is_identity_and_trained_tau_changes_outputs(md3):
    config = copy.deepcopy(md3.config)
    config.text.use_tau = False
    plain = MoondreamModel(config).eval()
    plain.load_state_dict({k: v for k, v in md3.state_dict().items() if ".tau." not in k})
    zero_tau = copy.deepcopy(md3)
    with torch.no_grad():
        for block in zero_tau.text.blocks:
            for p in block.attn.tau.parameters():
                p.zero_()
    embeds = torch.randn(2, 12, 128)
    with torch.no_grad():
        torch.testing.assert_close(zero_tau.hidden_states(embeds), plain.hidden_states(embeds))
        assert not torch.allclose(md3.hidden_states(embeds), plain.hidden_states(embeds), atol=1e-3)


def test_tau_attention_equals_manual_computation(md3):
    attn: TextAttention = copy.deepcopy(md3.text.blocks[1].attn)
    with torch.no_grad():
        attn.tau.alpha.normal_(0, 1.0)  # make the position term matter
        x = torch.randn(2, 6, 128)
        positions = torch.tensor([[0, 1, 2, 3, 4, 5], [700, 729, 730, 731, 900, 4000]])
        causal = positions.unsqueeze(1) <= positions.unsqueeze(2)  # (B, query, key) over these tokens only
        ours = attn(x, positions, causal.unsqueeze(1))

        qkv = x @ attn.qkv.weight.T + attn.qkv.bias
        f = 0.5 * qkv * (1 + torch.erf(qkv / 2**0.5))
        outs = []
        for b in range(2):
            heads = []
            for h in range(2):
                q = qkv[b, :, 64 * h : 64 * (h + 1)]
                k = qkv[b, :, 128 + 64 * h : 128 + 64 * (h + 1)]
                v = qkv[b, :, 256 + 64 * h : 256 + 64 * (h + 1)]
                tpos = 0.5 + torch.sigmoid(attn.tau.alpha[h] * torch.log(positions[b].float() + 1))
                q = q * (torch.tanh(f[b] @ attn.tau.wq[h]) + tpos)[:, None]
                v = v * (torch.tanh(f[b] @ attn.tau.wv[h]) + tpos)[:, None]
                q, k = (apply_rope(t[None, None], positions[b : b + 1], 1.5e6)[0, 0] for t in (q, k))
                scores = (q @ k.T / 8.0).masked_fill(~causal[b], float("-inf"))
                heads.append(scores.softmax(-1) @ v)
            outs.append(torch.cat(heads, dim=-1))
        manual = torch.stack(outs) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(ours, manual, rtol=1e-4, atol=1e-5)


def test_tau_casts_positions_to_bf16_before_adding_one(md3):
    """The sheet's quirk: in bf16, positions 255..257 all act as 256, 729 and 730 as 728."""
    tau = copy.deepcopy(md3.text.blocks[0].attn.tau).to(torch.bfloat16)
    with torch.no_grad():
        tau.wq.zero_()
        tau.alpha.fill_(0.7)
        qkv = torch.zeros(1, 6, tau.wq.shape[1], dtype=torch.bfloat16)
        gain_q, _ = tau(qkv, torch.tensor([[255, 256, 257, 729, 730, 731]]))
        p = torch.tensor([256, 256, 256, 728, 728, 732], dtype=torch.bfloat16)
        expected = 1 + (torch.sigmoid(torch.tensor(0.7, dtype=torch.bfloat16) * torch.log(p)) - 0.5)
    assert torch.equal(gain_q[0, 0, :, 0], expected)


# ---- decoding ----------------------------------------------------------------------------------------
def test_cached_decode_equals_full_forward(md3):
    """Prefill of the image prefix, then one token at a time, equals the one-pass training forward."""
    prefix, total = md3.config.prefix_len, md3.config.prefix_len + 4
    embeds = torch.randn(2, total, 128)
    with torch.no_grad():
        full = md3.hidden_states(embeds)
        cache = KVCache(md3.config.text, 2, total, "cpu", torch.float32)
        positions = torch.arange(prefix).expand(2, -1)
        steps = [md3.text(embeds[:, :prefix], positions, attention_mask(positions, prefix, prefix), cache)]
        for t in range(prefix, total):
            positions = torch.full((2, 1), t)
            steps.append(md3.text(embeds[:, t : t + 1], positions, attention_mask(positions, t + 1, prefix), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_detect_and_point_return_objects(md3):
    model = copy.deepcopy(md3)
    with torch.no_grad():
        model.text.lm_head.bias[0] = -30.0  # never choose end-of-text, so every object slot is used
    image = model.encode_image(random_image(378, 378, seed=1))
    objects = model.detect(image, "player", {"max_objects": 3})["objects"]
    assert len(objects) == 3
    assert all(o["x_min"] <= o["x_max"] and o["y_min"] <= o["y_max"] for o in objects)
    points = model.point(image, "player", {"max_objects": 2})["points"]
    assert len(points) == 2 and all(0 <= p["x"] < 1 and 0 <= p["y"] < 1 for p in points)
    batch = model.detect_batch([(image, "player"), (image, "ball")], {"max_objects": 3})
    assert [(o["x_min"], o["y_max"]) for o in batch[0]] == [(o["x_min"], o["y_max"]) for o in objects]


def test_restricted_stop_decision_reads_only_eos_and_coord(md3):
    logits = torch.randn(3, md3.config.text.vocab_size)
    logits[:, 5] = logits[:, 0] + torch.tensor([1.0, -1.0, 0.5])
    spiked = logits.clone()
    spiked[:, 7] = 1e4
    spiked[:, 100] = -1e4
    for a, b in zip(md3.decision_logprobs(logits), md3.decision_logprobs(spiked)):
        assert torch.equal(a, b)
    assert md3.decision_logprobs(logits)[2].tolist() == [False, True, False]
    md2_style = copy.copy(md3)
    md2_style.config = copy.deepcopy(md3.config)
    md2_style.config.restrict_stop_decision = False
    assert md2_style.decision_logprobs(spiked)[2].tolist() == [False, False, False]
    # right after the prompt Moondream 3 reads the whole vocabulary, as Moondream 2 does everywhere
    for a, b in zip(md3.decision_logprobs(spiked, after_prompt=True), md2_style.decision_logprobs(spiked)):
        assert torch.equal(a, b)
    for a, b in zip(md3.decision_token_logprobs(spiked, True), md2_style.decision_token_logprobs(spiked)):
        assert torch.equal(a, b)


def third_token_wins(md3) -> MoondreamModel:
    """A copy where a token that is neither end-of-text nor the coordinate token wins everywhere and
    end-of-text beats the coordinate token: the original's "any object?" argmax is not end-of-text,
    so it emits one object, then "another?" over the two tokens stops."""
    model = copy.deepcopy(md3)
    with torch.no_grad():
        model.text.lm_head.bias[[7, 0, 5]] += torch.tensor([20.0, 10.0, -10.0])
    return model


def test_first_decision_is_a_whole_vocabulary_argmax(md3):
    model = third_token_wins(md3)
    image = model.encode_image(random_image(378, 378, seed=1))
    for settings in ({}, {"temperature": 1.0}):
        assert len(model.detect(image, "player", settings)["objects"]) == 1
        assert len(model.point(image, "player", settings)["points"]) == 1
    assert [len(objects) for objects in model.detect_batch([(image, "player"), (image, "ball")])] == [1, 1]


def test_training_reads_each_decision_where_inference_does(md3):
    """GRPO's replay and the supervised targets use the whole vocabulary right after the prompt and
    the two tokens after an object; on `third_token_wins` the two rules differ by about 10 nats."""
    model = third_token_wins(md3)
    prompt = model.prompt_tokens("detect", "player")
    features = model.image_embeddings(random_image(96, 96, seed=2))
    with torch.no_grad():
        trace = run_region_loop(model, [model.encode_image(features)] * 4, [prompt] * 4, 3, temperature=1.0,
                                generator=torch.Generator().manual_seed(0))
        targets, old = trace_targets(trace, [prompt] * 4, 3)
        new, _ = replay_logprobs(model, [features] * 4, targets, 1.0)
        assert trace.n_objects.tolist() == [1, 1, 1, 1]
        torch.testing.assert_close(new, torch.cat(old), rtol=0, atol=1e-5)

        batch = build_action_batch(model, [features], targets[:1])
        decisions = batch.kind == DECISION
        assert batch.after_prompt[decisions].tolist() == [True, False]
        hidden = model.hidden_states(batch.embeds).flatten(0, 1)[batch.read_at[decisions]]
        logits = model.text.logits(hidden).float()
        expected = [F.log_softmax(logits[0], -1)[5], F.log_softmax(logits[1, [0, 5]], -1)[0]]
        torch.testing.assert_close(action_logprobs(model, batch, decision_tokens=True)[decisions], torch.stack(expected))


# ---- gradient checkpointing --------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "tiny-md3"])
def test_gradient_checkpointing_gives_identical_grads(preset):
    model = random_init(MoondreamModel(MoondreamConfig.preset(preset)), 3)
    embeds = torch.randn(2, 48, 128)

    def run(checkpointing: bool):
        model.zero_grad()
        model.text.gradient_checkpointing = checkpointing
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            hidden = model.hidden_states(embeds)
            loss = hidden.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    loss_plain, grads_plain, saved_plain = run(False)
    loss_ckpt, grads_ckpt, saved_ckpt = run(True)
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_ckpt[name]), name
    assert saved_ckpt < saved_plain / 2


# ---- weight layouts ----------------------------------------------------------------------------------
def with_region_ln(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The newer revision's extra tensors (662-key layout)."""
    return {**state, "region.ln.weight": torch.rand(128) + 0.5, "region.ln.bias": torch.randn(128)}


LAYOUTS = {
    "module": lambda s: s,
    "hub": lambda s: {"model." + k: v for k, v in s.items()},
    "module+region_ln": with_region_ln,
    "hub+region_ln": lambda s: {"model." + k: v for k, v in with_region_ln(s).items()},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_md3_layout_round_trips_through_safetensors(md3, layout, tmp_path):
    state = LAYOUTS[layout](plain_state(md3))
    save_file(state, str(tmp_path / "w.safetensors"))
    model = make_md3(seed=1)
    model.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    plain = {k.removeprefix("model."): v for k, v in state.items()}
    loaded = model.state_dict()
    assert loaded.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.equal(loaded[key], value), key

    hidden = torch.randn(4, 128)
    if "region_ln" in layout:  # the newer revision normalises the hidden state before decoding
        assert model.config.region.use_layernorm
        hidden_seen = F.layer_norm(hidden, (128,), plain["region.ln.weight"], plain["region.ln.bias"])
    else:
        hidden_seen = hidden
    torch.testing.assert_close(model.region.decode_coordinate(hidden), md3.region.coord_decoder(hidden_seen))


def test_hub_shards_download_and_merge_into_the_trainer_layout(md3, tmp_path, monkeypatch):
    hub = {"model." + k: v for k, v in plain_state(md3).items()}
    keys = sorted(hub)
    shards = [tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"]
    save_file({k: hub[k] for k in keys[::2]}, str(shards[0]), metadata={"format": "pt"})
    save_file({k: hub[k] for k in keys[1::2]}, str(shards[1]), metadata={"format": "pt"})
    index = {"weight_map": {k: shards[i % 2].name for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    downloads = []

    def fake_download(repo, filename, revision=None, **kwargs):
        downloads.append((repo, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    merged = ensure_weights(tmp_path / "out" / "model_md3.safetensors", CHECKPOINTS["md3"])
    assert downloads[0] == (MD3_REPO, "model.safetensors.index.json") and len(downloads) == 3
    state = load_file(str(merged))
    assert set(state) == {k.removeprefix("model.") for k in keys}  # prefix stripped: the trainer layout
    model = make_md3(seed=1)
    model.load_state_dict(state)
    assert_same_weights(model, md3)

    model = make_md3(seed=1)
    model.load_state_dict(load_weights_file(tmp_path))  # or load the shard folder directly
    assert_same_weights(model, md3)


def test_strict_load_lists_missing_and_unexpected_keys(md3):
    state = plain_state(md3)
    del state["text.blocks.1.attn.tau.alpha"]
    state["text.blocks.1.mlp.fc1.bias"] = torch.zeros(256)
    with pytest.raises(RuntimeError) as err:
        make_md3(1).load_state_dict(state)
    assert "text.blocks.1.attn.tau.alpha" in str(err.value)
    assert "text.blocks.1.mlp.fc1.bias" in str(err.value)

    md2_state = MoondreamModel(MoondreamConfig.preset("tiny")).state_dict()
    with pytest.raises(RuntimeError, match="region.coord_decoder.fc1.weight"):
        make_md3(1).load_state_dict(md2_state)

    fp8 = {**plain_state(md3), "text_model.transformer.h.1.moe_quant.up_scale": torch.ones(1)}
    with pytest.raises(UserInputError, match="FP8"):
        make_md3(1).load_state_dict(fp8)


def test_weight_paths_and_offline_download_error(tmp_path):
    assert str(default_weights_path("md3")) == "models/model_md3.safetensors"
    assert str(default_weights_path("md2")) == "moondream2/model.safetensors"
    assert default_weights_path("tiny-md3") is None and default_weights_path("tiny") is None
    target = tmp_path / "model_md3.safetensors"
    with pytest.raises(UserInputError) as err:  # conftest sets HF_HUB_OFFLINE
        ensure_weights(target, CHECKPOINTS["md3"])
    message = str(err.value)
    assert "\n" not in message and str(target) in message and MD3_REPO in message


# ---- detect against an independent step-by-step re-implementation ------------------------------------
def oracle_moe(p: dict[str, torch.Tensor], h: torch.Tensor, top_k: int) -> torch.Tensor:
    """The fact sheet's MoE (section 3.3), as the reference's prefill runs it: top-k on the raw router
    logits, softmax over those k only, then a loop over the experts in id order, each on the tokens
    routed to it; expert e is gelu_erf(a) * (g + 1) with a, g the first and second half of fc1[e]."""
    logits = h @ p["router.weight"].T + p["router.bias"]
    vals, idx = logits.topk(top_k, dim=-1)
    w = vals.softmax(dim=-1)
    out = torch.zeros_like(h)
    inner = p["fc2.weight"].shape[2]
    for e in range(p["fc1.weight"].shape[0]):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if len(rows) == 0:
            continue
        u = h[rows] @ p["fc1.weight"][e].T
        a, g = u[:, :inner], u[:, inner:]
        z = 0.5 * a * (1 + torch.erf(a / math.sqrt(2))) * (g + 1)
        out[rows] += w[rows, slot, None] * (z @ p["fc2.weight"][e].T)
    return out


class Md3Oracle:
    """Moondream 3's text decoder, region head and detect loop written from the fact sheet (sections 3,
    4, 5.2, 6.3) in float64, recomputing the whole sequence at every step (no KV cache). Only the
    parameters come from the model; the image tokens come from its vision encoder, which Moondream 3
    shares byte for byte with Moondream 2 and which `test_model.py` pins to the original's outputs."""

    theta = 1.5e6  # RoPE base (Moondream 2: 10 000)
    prefix = 1 + 27**2  # BOS and the image tokens of a 378-pixel crop in 14-pixel patches

    def __init__(self, model: MoondreamModel):
        self.p = {k: v.detach().double() for k, v in model.state_dict().items()}
        # The sizes of the preset (not Moondream 3 facts): width, heads, blocks, experts per token.
        c = model.config.text
        self.heads, self.dim, self.n_layers, self.top_k = c.n_heads, c.dim, c.n_layers, c.moe.experts_per_token

    def ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.p[f"{name}.weight"] + self.p[f"{name}.bias"]

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T, hd): dims j and j + hd/4 rotate together by p * theta^(-2j / (hd/2)), j < hd/4; the
        second half of the head passes through. (The original writes the pairs interleaved; q and k get
        the same permutation, so the attention scores are the same.)"""
        quarter = x.shape[-1] // 4
        out = x.clone()
        for j in range(quarter):
            angle = positions * self.theta ** (-2 * j / (2 * quarter))
            re, im, cos, sin = x[:, j], x[:, j + quarter], torch.cos(angle), torch.sin(angle)
            out[:, j], out[:, j + quarter] = re * cos - im * sin, re * sin + im * cos
        return out

    def attention(self, i: int, h: torch.Tensor) -> torch.Tensor:
        p, t, hd = self.p, h.shape[0], self.dim // self.heads
        qkv = h @ p[f"text.blocks.{i}.attn.qkv.weight"].T + p[f"text.blocks.{i}.attn.qkv.bias"]
        f = 0.5 * qkv * (1 + torch.erf(qkv / math.sqrt(2)))  # tau reads the whole qkv through exact GELU
        positions = torch.arange(t, dtype=torch.float64)
        allowed = torch.ones(t, t, dtype=torch.bool).tril()
        allowed[: self.prefix, : self.prefix] = True  # the image prefix sees itself whole
        heads = []
        for head in range(self.heads):
            q, k, v = (qkv[:, part * self.dim + head * hd : part * self.dim + (head + 1) * hd] for part in range(3))
            tq = torch.tanh(f @ p[f"text.blocks.{i}.attn.tau.wq"][head])
            tv = torch.tanh(f @ p[f"text.blocks.{i}.attn.tau.wv"][head])
            tpos = 1 + (torch.sigmoid(p[f"text.blocks.{i}.attn.tau.alpha"][head] * torch.log(positions + 1)) - 0.5)
            q, v = q * (tq + tpos)[:, None], v * (tv + tpos)[:, None]  # k is not scaled
            q, k = self.rope(q, positions), self.rope(k, positions)
            scores = (q @ k.T / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
            heads.append(scores.softmax(-1) @ v)
        return torch.cat(heads, -1) @ p[f"text.blocks.{i}.attn.proj.weight"].T + p[f"text.blocks.{i}.attn.proj.bias"]

    def mlp_params(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"text.blocks.{i}.mlp."
        return {k.removeprefix(prefix): v for k, v in self.p.items() if k.startswith(prefix)}

    def ffn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        p = self.p
        if f"text.blocks.{i}.mlp.router.weight" in p:
            return oracle_moe(self.mlp_params(i), h, self.top_k)
        u = h @ p[f"text.blocks.{i}.mlp.fc1.weight"].T + p[f"text.blocks.{i}.mlp.fc1.bias"]
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))  # dense blocks: tanh GELU
        return u @ p[f"text.blocks.{i}.mlp.fc2.weight"].T + p[f"text.blocks.{i}.mlp.fc2.bias"]

    def hidden(self, embeds: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """(T, dim) hidden states before post_ln (what the region head reads) after `n_layers` blocks."""
        x = embeds
        for i in range(self.n_layers if n_layers is None else n_layers):
            h = self.ln(x, f"text.blocks.{i}.ln")
            x = x + self.attention(i, h) + self.ffn(i, h)  # parallel residual: one LayerNorm per block
        return x

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln(hidden, "text.post_ln") @ self.p["text.lm_head.weight"].T + self.p["text.lm_head.bias"]

    def fourier(self, x: list[float], w: torch.Tensor) -> torch.Tensor:
        """[cos f, sin f] with f = (2 pi x) @ W."""
        f = (2 * math.pi * torch.tensor(x, dtype=torch.float64)) @ w
        return torch.cat([torch.cos(f), torch.sin(f)], -1)

    def prompt_embeds(self, image_tokens: torch.Tensor, prompt: list[int]) -> torch.Tensor:
        """[BOS][image tokens] (positions 0..729), then the prompt's token embeddings."""
        return torch.cat([self.p["text.wte"][[0]], image_tokens.double(), self.p["text.wte"][prompt]])

    def detect(self, image_tokens: torch.Tensor, prompt: list[int], max_objects: int) -> tuple[list, list, list]:
        """The greedy detect loop: boxes, each argmax's top-two margin (how far from a tie), and after
        each object the logit of end-of-text minus that of the coordinate token."""
        p = self.p
        embeds = self.prompt_embeds(image_tokens, prompt)
        hidden = self.hidden(embeds)[-1]
        logits = self.lm_logits(hidden)
        top = logits.topk(2).values
        margins = [float(top[0] - top[1])]
        next_token = int(logits.argmax())  # right after the prompt: the whole vocabulary
        boxes: list[tuple[float, ...]] = []
        stop_minus_continue: list[float] = []

        def step(embedding: torch.Tensor) -> torch.Tensor:
            nonlocal embeds
            embeds = torch.cat([embeds, embedding[None]])
            return self.hidden(embeds)[-1]

        def argmax(values: torch.Tensor) -> int:
            top = values.topk(2).values
            margins.append(float(top[0] - top[1]))
            return int(values.argmax())

        while next_token != 0 and len(boxes) < max_objects:
            x = argmax(hidden @ p["region.coord_decoder.weight"].T + p["region.coord_decoder.bias"]) / 1024
            hidden = step(self.fourier([x], p["region.coord_features"]) @ p["region.coord_encoder.weight"].T
                          + p["region.coord_encoder.bias"])
            y = argmax(hidden @ p["region.coord_decoder.weight"].T + p["region.coord_decoder.bias"]) / 1024
            hidden = step(self.fourier([y], p["region.coord_features"]) @ p["region.coord_encoder.weight"].T
                          + p["region.coord_encoder.bias"])
            size_logits = (hidden @ p["region.size_decoder.weight"].T + p["region.size_decoder.bias"]).view(2, -1)
            w, h = (2 ** (argmax(row) / 1023 * 10 - 10) for row in size_logits)
            boxes.append((x - w / 2, y - h / 2, x + w / 2, y + h / 2))
            hidden = step(self.fourier([w, h], p["region.size_features"]) @ p["region.size_encoder.weight"].T
                          + p["region.size_encoder.bias"])
            # "Another object?" reads only the coordinate token and end-of-text, in that order.
            decision = self.lm_logits(hidden)
            stop_minus_continue.append(float(decision[0] - decision[5]))
            next_token = (5, 0)[argmax(decision[[5, 0]])]
        return boxes, margins, stop_minus_continue


def md3_for_the_oracle() -> MoondreamModel:
    """tiny-md3 with weights large enough that every part matters: fan-in scaled matrices (experts
    included), a position-dependent tau, and a leading token that is neither end-of-text nor the
    coordinate token, so the stop decision rule decides the object count (a whole-vocabulary argmax
    would never stop)."""
    torch.manual_seed(0)
    model = random_init(MoondreamModel(MoondreamConfig.preset("tiny-md3")), 0, linear_gain=1.0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.text.blocks:
            block.attn.tau.alpha.copy_(torch.randn(block.attn.tau.alpha.shape, generator=generator))
            for w in (block.attn.tau.wq, block.attn.tau.wv):
                w.copy_(torch.randn(w.shape, generator=generator) * 3 / w.shape[1] ** 0.5)
            if isinstance(block.mlp, MoeMLP):
                for w in (block.mlp.fc1.weight, block.mlp.fc2.weight):
                    w.copy_(torch.randn(w.shape, generator=generator) / w.shape[2] ** 0.5)
        model.text.lm_head.bias[7] += 20.0
    return model


def test_detect_matches_a_step_by_step_reimplementation_of_the_fact_sheet():
    """tiny-md3's boxes for a fixed image equal those of `Md3Oracle`, the stop rule included: the
    model is tuned (from the oracle's numbers) to stop after a few objects on the two-token decision,
    where a whole-vocabulary argmax would go on to max_objects."""
    model = md3_for_the_oracle()
    with torch.no_grad():
        image_tokens = model.image_embeddings(random_image(378, 378, seed=1))
    prompt = model.prompt_tokens("detect", "car")
    assert prompt[:4] == [1, 7235, 476, 2] and prompt[-1] == 3
    with torch.no_grad():
        model.text.lm_head.bias[0] -= 100.0  # never stop: the oracle shows where each decision stands
        _, _, gaps = Md3Oracle(model).detect(image_tokens, prompt, max_objects=5)
        # Stop after object k + 1 (measured: k = 3, the decisions stand 0.24 or more from a tie).
        k = max(i for i in range(1, 4) if gaps[i] > max(gaps[:i]))
        model.text.lm_head.bias[0] -= (gaps[k] + max(gaps[:k])) / 2
    oracle = Md3Oracle(model)
    boxes, margins, _ = oracle.detect(image_tokens, prompt, max_objects=5)
    assert len(boxes) == k + 1 and min(margins) > 1e-3  # no near-tie that float32 rounding could flip

    objects = model.detect(model.encode_image(image_tokens), "car", {"max_objects": 5})["objects"]
    got = [(o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in objects]
    assert len(got) == len(boxes)
    for ours, expected in zip(got, boxes):
        assert ours == pytest.approx(expected, abs=1e-6)

    whole_vocabulary = copy.deepcopy(model)
    whole_vocabulary.config.restrict_stop_decision = False
    assert len(whole_vocabulary.detect(image_tokens, "car", {"max_objects": 5})["objects"]) == 5

    # The decoder's hidden states (the training forward), which the boxes only sample through argmaxes.
    embeds = oracle.prompt_embeds(image_tokens, prompt)
    with torch.no_grad():
        ours = model.hidden_states(embeds.float()[None])[0]
    torch.testing.assert_close(ours.double(), oracle.hidden(embeds), rtol=1e-4, atol=1e-4)

    # One MoE block on the real hidden states of the prompt, against the loop over experts.
    block = model.text.blocks[1]
    x = oracle.hidden(embeds, n_layers=1)
    h = oracle.ln(x, "text.blocks.1.ln")
    with torch.no_grad():
        ours = block.mlp(h.float())
    expected = oracle_moe(oracle.mlp_params(1), h, oracle.top_k)
    assert expected.abs().mean() > 0.1  # the experts matter at this scale
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)
