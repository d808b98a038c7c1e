"""The Moondream 2 model: fidelity to the original code, the spec's loading snippet, state dicts in
every published layout, and the detect / point / query API on a randomly initialised tiny model."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import moondream2.moondream as moondream_module
from moondream2 import MoondreamConfig, MoondreamModel, UserInputError
from moondream2.decoding import run_region_loop
from moondream2.image_crops import normalize_crops, overlap_crop_image
from moondream2.moondream_functions import detect as fn_detect
from moondream2.moondream_functions import point as fn_point

from conftest import GOLDEN_DIR, make_tiny_model, random_image

BOX_KEYS = ("x_min", "y_min", "x_max", "y_max")


def boxes(objects: list[dict]) -> list[tuple[float, ...]]:
    return [tuple(o[k] for k in BOX_KEYS) for o in objects]


def assert_boxes_equal(actual: list[dict], expected: list[dict], atol: float = 1e-6):
    assert len(actual) == len(expected), (len(actual), len(expected))
    for a, e in zip(boxes(actual), boxes(expected)):
        assert a == pytest.approx(e, abs=atol), (a, e)


# ---------------------------------------------------------------------------------------------
# 1. Golden fidelity: the original code's outputs on the tiny random model
# ---------------------------------------------------------------------------------------------

GOLDEN_LOGITS = {
    "prompt_lm": "detect.prompt_lm_logits",
    "prompt_hidden": "detect.prompt_hidden_last",
    "x": "detect.x_logits",
    "y": "detect.y_logits",
    "size": "detect.size_logits",
    "lm": "detect.next_lm_logits",
}


def test_golden_crops_equal_exactly(golden_model, golden_image, golden_tensors):
    crops = overlap_crop_image(golden_image, golden_model.config.vision)
    pixels = normalize_crops(crops.crops, "cpu", torch.float32)
    expected = golden_tensors["crops"]
    assert pixels.shape == expected.shape
    torch.testing.assert_close(pixels, expected, atol=0.0, rtol=0.0)


def test_golden_image_embeddings(golden_model, golden_image, golden_tensors):
    crops = overlap_crop_image(golden_image, golden_model.config.vision)
    pixels = normalize_crops(crops.crops, "cpu", torch.float32)
    with torch.no_grad():
        embeds = golden_model.vision(pixels, crops.tiling)
        from_stored_crops = golden_model.vision(golden_tensors["crops"], crops.tiling)
        via_api = golden_model.image_embeddings(golden_image)
    expected = golden_tensors["image_embeds"]
    torch.testing.assert_close(embeds, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_stored_crops, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(via_api, expected, atol=1e-4, rtol=1e-4)


def test_golden_prompt_tokens_both_tokenizers(golden_model, golden_manifest):
    expected = golden_manifest["inputs"]["prompt_token_ids"]
    assert golden_model.prompt_tokens("detect", "player") == expected  # builtin tokenizer

    golden_tokenizer = Tokenizer.from_file(str(GOLDEN_DIR / "tokenizer.json"))
    with_file = MoondreamModel(config=MoondreamConfig.preset("tiny"), tokenizer=golden_tokenizer)
    assert with_file.prompt_tokens("detect", "player") == expected


def test_golden_region_loop_logits(golden_model, golden_image, golden_tensors, golden_manifest):
    prompt = golden_manifest["inputs"]["prompt_token_ids"]
    n = golden_manifest["detect"]["max_objects"]
    with torch.no_grad():
        trace = run_region_loop(golden_model, [golden_model.encode_image(golden_image)], [prompt], n,
                                record_logits=True)
    assert int(trace.n_objects[0]) == n
    for ours, theirs in GOLDEN_LOGITS.items():
        expected = golden_tensors[theirs]
        actual = trace.logits[ours][0].reshape(expected.shape)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=f"{ours} vs {theirs}")
        assert torch.equal(actual.argmax(-1), expected.argmax(-1)), f"argmax of {ours} differs"
    # The bins the loop chose are the argmax bins of the recorded golden logits.
    assert torch.equal(trace.x_bins[0], golden_tensors["detect.x_logits"].argmax(-1))
    assert torch.equal(trace.y_bins[0], golden_tensors["detect.y_logits"].argmax(-1))
    assert torch.equal(trace.size_bins[0], golden_tensors["detect.size_logits"].argmax(-1))


def test_golden_detect_boxes(golden_model, golden_image, golden_manifest):
    expected = golden_manifest["detect"]["objects"]
    result = golden_model.detect(golden_image, "player", settings={"max_objects": 5})
    assert_boxes_equal(result["objects"], expected, atol=1e-6)
    functional = fn_detect(golden_model, golden_image, "player", {"max_objects": 5}, temperature=0.0)
    assert_boxes_equal(functional["objects"], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. The spec's loading snippet, offline
# ---------------------------------------------------------------------------------------------


def test_spec_snippet_roundtrip(tmp_path, tiny_model, test_image):
    path = tmp_path / "model.safetensors"
    save_file(tiny_model.state_dict(), str(path))
    device = "cpu"

    model = MoondreamModel(config=MoondreamConfig.preset("tiny"), setup_caches=True)
    model.load_state_dict(load_file(path))
    model.to(device)
    result = model.detect(test_image, "piece", settings={"max_objects": 40})

    objects = result["objects"]
    assert isinstance(objects, list) and len(objects) <= 40
    expected = tiny_model.detect(test_image, "piece", settings={"max_objects": 40})["objects"]
    assert_boxes_equal(objects, expected, atol=0.0)


def test_default_construction_is_offline(monkeypatch, test_image):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(Tokenizer, "from_pretrained", no_network)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    model = MoondreamModel(config=MoondreamConfig.preset("tiny"))
    assert model.config.tokenizer.source == "builtin"
    ids = model.tokenizer.encode(" ab").ids  # builtin byte tokenizer: one token per byte, ids 512-767
    assert len(ids) == 3 and all(512 <= i < 768 for i in ids)
    assert model.tokenizer.decode(ids) == " ab"
    result = model.detect(test_image, "piece", settings={"max_objects": 2})
    assert len(result["objects"]) <= 2


# ---------------------------------------------------------------------------------------------
# 3. State dicts: no caches, every published layout, strictness
# ---------------------------------------------------------------------------------------------

# Module name -> legacy (layout A) name: the inverse of the fact sheet's §9.2 table.
_V = "vision_encoder.encoder.model.visual"
_P = "vision_encoder.projection.mlp"
_T = "text_model.transformer.h"
_R = "region_model"
MODULE_TO_LEGACY: list[tuple[str, str]] = [
    (r"^vision\.patch_emb\.(weight|bias)$", _V + r".patch_embed.linear.\1"),
    (r"^vision\.pos_emb$", _V + ".pos_embed"),
    (r"^vision\.blocks\.(\d+)\.ln1\.(weight|bias)$", _V + r".blocks.\1.norm1.\2"),
    (r"^vision\.blocks\.(\d+)\.ln2\.(weight|bias)$", _V + r".blocks.\1.norm2.\2"),
    (r"^vision\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", _V + r".blocks.\1.attn.\2.\3"),
    (r"^vision\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", _V + r".blocks.\1.mlp.\2.\3"),
    (r"^vision\.post_ln\.(weight|bias)$", _V + r".norm.\1"),
    (r"^vision\.proj_mlp\.(fc1|fc2)\.(weight|bias)$", _P + r".\1.\2"),
    (r"^text\.wte$", "text_model.transformer.embd.wte.weight"),
    (r"^text\.blocks\.(\d+)\.ln\.(weight|bias)$", _T + r".\1.ln.\2"),
    (r"^text\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", _T + r".\1.mixer.Wqkv.\2"),
    (r"^text\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$", _T + r".\1.mixer.out_proj.\2"),
    (r"^text\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", _T + r".\1.mlp.\2.\3"),
    (r"^text\.post_ln\.(weight|bias)$", "text_model.lm_head.ln.\\1"),
    (r"^text\.lm_head\.(weight|bias)$", "text_model.lm_head.linear.\\1"),
    (r"^region\.coord_features$", _R + ".coordinate_features.weight"),
    (r"^region\.size_features$", _R + ".size_features.weight"),
    (r"^region\.coord_encoder\.(weight|bias)$", _R + r".coordinate_encoder.\1"),
    (r"^region\.coord_decoder\.(fc1|fc2)\.(weight|bias)$", _R + r".coordinate_decoder.\1.\2"),
    (r"^region\.size_encoder\.(weight|bias)$", _R + r".size_encoder.\1"),
    (r"^region\.size_decoder\.(fc1|fc2)\.(weight|bias)$", _R + r".size_decoder.\1.\2"),
]
LEGACY_TRANSPOSED = {"region.coord_features", "region.size_features"}


def to_legacy_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in MODULE_TO_LEGACY:
            new, n = re.subn(pattern, replacement, key)
            if n:
                break
        else:
            raise AssertionError(f"no legacy name for {key}")
        out[new] = value.t().contiguous() if key in LEGACY_TRANSPOSED else value.clone()
    return out


def fingerprint(model: MoondreamModel, image) -> tuple[torch.Tensor, list[dict]]:
    """Logits of a short region loop (touches vision, text, and all region parts) plus detect boxes."""
    with torch.no_grad():
        trace = run_region_loop(model, [model.encode_image(image)], [model.prompt_tokens("detect", "x")], 2,
                                record_logits=True)
    logits = torch.cat([trace.logits[k].flatten() for k in ("prompt_lm", "x", "y", "size", "lm")])
    return logits, model.detect(image, "x", settings={"max_objects": 3})["objects"]


def fresh_tiny() -> MoondreamModel:
    return MoondreamModel(config=MoondreamConfig.preset("tiny"), setup_caches=True).eval()


def test_state_dict_has_only_parameters(tiny_model):
    state = tiny_model.state_dict()
    names = [name for name, _ in tiny_model.named_parameters()]
    assert len(state) == len(names)
    assert set(state) == set(names)
    assert all(key.startswith(("vision.", "text.", "region.")) for key in state)
    assert not any("cache" in key for key in state)
    assert list(tiny_model.buffers()) == []


@pytest.mark.parametrize("layout", ["module", "hub", "legacy", "module+stale_caches"])
def test_state_dict_layouts_round_trip(layout, tmp_path, tiny_model, test_image):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    if layout == "hub":
        state = {"model." + k: v for k, v in state.items()}
    elif layout == "legacy":
        state = to_legacy_layout(state)
        assert state[_R + ".coordinate_features.weight"].shape == (128, 1)
        assert state[_R + ".size_features.weight"].shape == (256, 2)
        assert not any(k.startswith(("vision.", "text.", "region.")) for k in state)
    elif layout == "module+stale_caches":
        text = tiny_model.config.text
        for i in range(text.n_layers):
            for kind in ("k", "v"):
                state[f"text.blocks.{i}.kv_cache.{kind}_cache"] = torch.randn(
                    1, text.n_kv_heads, text.max_context, text.head_dim)
    path = tmp_path / f"{layout}.safetensors"
    save_file(state, str(path))

    model = fresh_tiny()
    result = model.load_state_dict(load_file(path))  # strict
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert not any("cache" in k for k in model.state_dict())
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    expected_logits, expected_boxes = fingerprint(tiny_model, test_image)
    logits, found = fingerprint(model, test_image)
    assert torch.equal(logits, expected_logits)
    assert_boxes_equal(found, expected_boxes, atol=0.0)


def test_strict_load_reports_missing_and_unexpected(tiny_model):
    state = tiny_model.state_dict()

    missing = {k: v for k, v in state.items() if k != "region.size_encoder.bias"}
    with pytest.raises(RuntimeError, match=re.escape("region.size_encoder.bias")):
        fresh_tiny().load_state_dict(missing)

    extra = {**state, "text.blocks.0.attn.bogus_weight": torch.zeros(3)}
    with pytest.raises(RuntimeError, match=re.escape("text.blocks.0.attn.bogus_weight")):
        fresh_tiny().load_state_dict(extra)

    both = {**missing, "text.blocks.0.attn.bogus_weight": torch.zeros(3)}
    result = fresh_tiny().load_state_dict(both, strict=False)
    assert list(result.missing_keys) == ["region.size_encoder.bias"]
    assert list(result.unexpected_keys) == ["text.blocks.0.attn.bogus_weight"]


# ---------------------------------------------------------------------------------------------
# 4. detect / point / query on the random tiny model
# ---------------------------------------------------------------------------------------------


def test_detect_returns_valid_boxes(tiny_model, test_image):
    objects = tiny_model.detect(test_image, "piece", settings={"max_objects": 4})["objects"]
    assert 1 <= len(objects) <= 4  # random weights: eos (id 0) is essentially never the argmax
    for obj in objects:
        assert set(BOX_KEYS) <= set(obj)
        assert obj["x_min"] < obj["x_max"] and obj["y_min"] < obj["y_max"]
        width, height = obj["x_max"] - obj["x_min"], obj["y_max"] - obj["y_min"]
        assert 2.0**-10 - 1e-9 <= width <= 1.0 + 1e-9 and 2.0**-10 - 1e-9 <= height <= 1.0 + 1e-9
        centre_x, centre_y = (obj["x_min"] + obj["x_max"]) / 2, (obj["y_min"] + obj["y_max"]) / 2
        assert 0.0 <= centre_x < 1.0 and 0.0 <= centre_y < 1.0
        assert 0.0 < obj["score"] <= 1.0


def test_point_returns_points(tiny_model, test_image):
    points = tiny_model.point(test_image, "piece", settings={"max_objects": 4})["points"]
    assert 1 <= len(points) <= 4
    for p in points:
        assert 0.0 <= p["x"] < 1.0 and 0.0 <= p["y"] < 1.0
    functional = fn_point(tiny_model, test_image, "piece", {"max_objects": 4})
    assert functional["points"] == points


def test_query_answer_and_max_tokens(tiny_model_copy, test_image, monkeypatch):
    model = tiny_model_copy
    produced: list[list[int]] = []
    original = moondream_module.generate_text

    def spy(*args, **kwargs):
        tokens = original(*args, **kwargs)
        produced.append(tokens)
        return tokens

    monkeypatch.setattr(moondream_module, "generate_text", spy)

    result = model.query(test_image, "what is this?", settings={"max_tokens": 5})
    assert set(result) == {"answer"} and isinstance(result["answer"], str)
    assert len(produced[-1]) <= 5

    # Force the answer: never end of text, always the byte "a" -> exactly 5 tokens "aaaaa".
    a_id = model.tokenizer.token_to_id("a")
    with torch.no_grad():
        model.text.lm_head.bias[model.config.tokenizer.eos_id] = -30.0
        model.text.lm_head.bias[a_id] = 30.0
    result = model.query(test_image, "what is this?", settings={"max_tokens": 5})
    assert produced[-1] == [a_id] * 5
    assert result["answer"] == "aaaaa"

    # And an answer that ends at once when end of text wins.
    with torch.no_grad():
        model.text.lm_head.bias[model.config.tokenizer.eos_id] = 60.0
    assert model.query(test_image, "what is this?", settings={"max_tokens": 5}) == {"answer": ""}
    assert produced[-1] == []


def test_temperature_sampling(tiny_model, test_image):
    def sample(seed: int):
        torch.manual_seed(seed)
        return tiny_model.detect(test_image, "piece", settings={"max_objects": 3, "temperature": 1.0})["objects"]

    first, again, other = sample(1), sample(1), sample(2)
    assert 0 < len(first) <= 3
    assert boxes(first) == boxes(again)  # reproducible under the global seed
    assert boxes(first) != boxes(other)  # and actually sampled (near-uniform bins on random weights)
    for obj in first:
        assert obj["x_min"] < obj["x_max"] and obj["y_min"] < obj["y_max"]

    torch.manual_seed(3)
    points = tiny_model.point(test_image, "piece", settings={"max_objects": 3, "temperature": 1.0})["points"]
    assert len(points) <= 3
    torch.manual_seed(3)
    answer = tiny_model.query(test_image, "hi", settings={"max_tokens": 3, "temperature": 1.0, "top_p": 0.9})
    assert isinstance(answer["answer"], str)


def test_max_objects_caps_the_count(tiny_model_copy, test_image):
    model = tiny_model_copy
    eos = model.config.tokenizer.eos_id
    with torch.no_grad():
        model.text.lm_head.bias[eos] = -30.0
    assert len(model.detect(test_image, "piece", settings={"max_objects": 3})["objects"]) == 3
    assert len(model.point(test_image, "piece", settings={"max_objects": 3})["points"]) == 3
    assert len(model.detect(test_image, "piece", settings={"max_objects": 1})["objects"]) == 1
    with torch.no_grad():
        model.text.lm_head.bias[eos] = 30.0
    assert model.detect(test_image, "piece", settings={"max_objects": 3}) == {"objects": []}
    assert model.point(test_image, "piece", settings={"max_objects": 3}) == {"points": []}


@pytest.mark.parametrize("call", ["detect", "point", "query", "detect_batch"])
def test_unknown_setting_raises(tiny_model, test_image, call):
    with pytest.raises(UserInputError, match="max_object"):
        if call == "detect_batch":
            tiny_model.detect_batch([(test_image, "a")], settings={"max_object": 3})
        else:
            getattr(tiny_model, call)(test_image, "a", settings={"max_object": 3})


def test_encoded_image_reuse(tiny_model, test_image_wide):
    encoded = tiny_model.encode_image(test_image_wide)
    assert tiny_model.encode_image(encoded) is encoded
    for name in ("piece", "a much longer class name", "x"):
        from_pil = tiny_model.detect(test_image_wide, name, settings={"max_objects": 3})
        from_encoded = tiny_model.detect(encoded, name, settings={"max_objects": 3})
        assert_boxes_equal(from_encoded["objects"], from_pil["objects"], atol=0.0)
    assert (tiny_model.point(encoded, "piece", settings={"max_objects": 3})
            == tiny_model.point(test_image_wide, "piece", settings={"max_objects": 3}))
    assert (tiny_model.query(encoded, "what?", settings={"max_tokens": 4})
            == tiny_model.query(test_image_wide, "what?", settings={"max_tokens": 4}))
    # Reusing the encoding must not have altered it.
    again = tiny_model.encode_image(test_image_wide)
    for a, b in zip(encoded.k + encoded.v, again.k + again.v):
        assert torch.equal(a, b)


def test_non_image_input_raises(tiny_model):
    with pytest.raises(UserInputError):
        tiny_model.detect("not an image", "piece")


def test_detect_batch_equals_one_at_a_time(tiny_model, test_image, test_image_wide):
    requests = [(test_image, "a"), (test_image, "bb"), (test_image_wide, "c"), (test_image, "a longer name")]
    lengths = {len(tiny_model.prompt_tokens("detect", name)) for _, name in requests}
    assert len(lengths) >= 3  # prompts of different lengths: padding is exercised
    settings = {"max_objects": 4}
    batched = tiny_model.detect_batch(requests, settings)
    assert len(batched) == len(requests)
    for (image, name), objects in zip(requests, batched):
        single = tiny_model.detect(image, name, settings=settings)["objects"]
        assert_boxes_equal(objects, single, atol=1e-6)
        for a, b in zip(objects, single):
            assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-9)

    points = tiny_model.detect_batch(requests, settings, task="point")
    for (image, name), found in zip(requests, points):
        single = tiny_model.point(image, name, settings=settings)["points"]
        assert [(p["x"], p["y"]) for p in found] == [(p["x"], p["y"]) for p in single]


def test_detect_batch_mixed_stop_times(tiny_model_copy, test_image, test_image_wide):
    """Sequences of one batch that stop at different steps keep their own objects.

    The end-of-text row of the LM head is set so that its logit after the prompt is +10 for the
    class "a" and -10 for "bb": "a" stops at once while "bb" goes on in the same batch.
    """
    model = tiny_model_copy
    with torch.no_grad():
        final = {}
        for name in ("a", "bb"):
            trace = run_region_loop(model, [model.encode_image(test_image)], [model.prompt_tokens("detect", name)],
                                    1, record_logits=True)
            final[name] = model.text.post_ln(trace.logits["prompt_hidden"][0, 0])
        direction = final["a"] - final["bb"]
        row = direction * (20.0 / direction.dot(direction))
        eos = model.config.tokenizer.eos_id
        model.text.lm_head.weight[eos] = row
        model.text.lm_head.bias[eos] = -row.dot((final["a"] + final["bb"]) / 2)
    requests = [(test_image, "a"), (test_image, "bb"), (test_image_wide, "a"), (test_image_wide, "bb")]
    settings = {"max_objects": 4}
    singles = [model.detect(image, name, settings=settings)["objects"] for image, name in requests]
    assert len(singles[0]) == 0 and len(singles[1]) > 0  # the setup works: mixed stop times
    batched = model.detect_batch(requests, settings)
    for objects, single in zip(batched, singles):
        assert_boxes_equal(objects, single, atol=1e-6)


def test_two_seeds_give_different_models():
    """Guards `random_init`: a seed that did nothing would make many tests above vacuous."""
    a, b = make_tiny_model(0), make_tiny_model(1)
    image = random_image(64, 64, seed=5)
    assert not torch.equal(a.text.wte, b.text.wte)
    assert not torch.equal(a.region.coord_features, b.region.coord_features)
    assert a.region.coord_features.std() > 0.5
    assert boxes(a.detect(image, "x", settings={"max_objects": 3})["objects"]) != boxes(
        b.detect(image, "x", settings={"max_objects": 3})["objects"])
