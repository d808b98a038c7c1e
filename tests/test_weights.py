"""Weight and tokenizer loading errors, key-layout conversion, and the real-size model's shape."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import tokenizers
import torch
from safetensors.torch import save_file

from moondream2 import MoondreamConfig, MoondreamModel, UserInputError
from moondream2.errors import DiskFull
from moondream2.tokenizer import load_tokenizer
from moondream2.weights import CHECKPOINTS, MD2_REPO, ensure_weights, load_weights_file, to_module_layout


def _offline(*args, **kwargs):
    raise OSError("network is unreachable (test)")


def test_load_weights_missing_file(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(UserInputError) as info:
        load_weights_file(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_weights_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(UserInputError) as info:
        load_weights_file(path)
    assert str(path) in str(info.value)


def test_load_weights_file_reads_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"text.wte": torch.randn(4, 3), "region.coord_features": torch.randn(1, 8)}
    save_file(tensors, str(path))
    loaded = load_weights_file(path)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)


def test_ensure_weights_offline_names_path_and_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _offline)
    missing = tmp_path / "weights" / "model.safetensors"
    with pytest.raises(UserInputError) as info:
        ensure_weights(missing)
    message = str(info.value)
    assert str(missing) in message
    assert MD2_REPO in message
    assert "\n" not in message  # one line for the command-line error printer
    assert not missing.exists()


def test_ensure_weights_existing_file_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _offline)
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    assert ensure_weights(path) == path


def test_ensure_weights_copies_download(tmp_path, monkeypatch):
    cached = tmp_path / "hub-cache" / "model.safetensors"
    cached.parent.mkdir()
    save_file({"x": torch.ones(2)}, str(cached))
    calls = []

    def fake_download(repo, filename, revision=None, **kwargs):
        calls.append((repo, filename, revision))
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    target = tmp_path / "out" / "model.safetensors"
    assert ensure_weights(target) == target
    assert calls and calls[0][0] == MD2_REPO
    assert torch.equal(load_weights_file(target)["x"], torch.ones(2))


def test_load_tokenizer_missing_file():
    with pytest.raises(UserInputError) as info:
        load_tokenizer("/nonexistent/tokenizer.json")
    assert "/nonexistent/tokenizer.json" in str(info.value)


def test_load_tokenizer_corrupt_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{ this is not a tokenizer")
    with pytest.raises(UserInputError) as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value)


def test_load_tokenizer_hub_offline(monkeypatch):
    monkeypatch.setattr(tokenizers.Tokenizer, "from_pretrained", _offline)
    with pytest.raises(UserInputError) as info:
        load_tokenizer("some-org/some-repo")
    message = str(info.value)
    assert "--tokenizer" in message
    assert "some-org/some-repo" in message


def test_load_tokenizer_builtin_and_folder(tmp_path):
    builtin = load_tokenizer("builtin")
    assert builtin.encode(" player").ids == [732, 591, 587, 576, 600, 580, 593]  # golden prompt bytes
    path = tmp_path / "tokenizer.json"
    builtin.save(str(path))
    from_folder = load_tokenizer(str(tmp_path))
    assert from_folder.encode("hello").ids == builtin.encode("hello").ids


def test_to_module_layout_conversions():
    w = torch.randn(1, 4)
    s = torch.randn(2, 6)
    converted = to_module_layout({
        "model.text.wte": torch.zeros(2, 2),
        "region_model.coordinate_features.weight": w.t(),
        "region_model.size_features.weight": s.t(),
        "text_model.transformer.h.3.mixer.Wqkv.bias": torch.zeros(6),
        "vision_encoder.encoder.model.visual.blocks.1.norm2.weight": torch.ones(3),
        "text.blocks.0.kv_cache.k_cache": torch.zeros(1),
        "text.blocks.0.kv_cache.v_cache": torch.zeros(1),
    })
    assert set(converted) == {
        "text.wte", "region.coord_features", "region.size_features", "text.blocks.3.attn.qkv.bias",
        "vision.blocks.1.ln2.weight",
    }
    assert torch.equal(converted["region.coord_features"], w)
    assert torch.equal(converted["region.size_features"], s)
    assert all(v.is_contiguous() for v in converted.values())


def test_real_config_on_meta_device():
    with torch.device("meta"):
        model = MoondreamModel(MoondreamConfig())
    assert sum(p.numel() for p in model.parameters()) == 1_927_237_104
    state = model.state_dict()
    assert len(state) == 592
    assert sum(k.startswith("vision.") for k in state) == 333
    assert sum(k.startswith("text.") for k in state) == 245
    assert sum(k.startswith("region.") for k in state) == 14
    assert tuple(state["region.coord_features"].shape) == (1, 128)
    assert tuple(state["region.size_features"].shape) == (2, 256)
    assert tuple(state["text.blocks.0.attn.qkv.weight"].shape) == (6144, 2048)
    assert tuple(state["vision.pos_emb"].shape) == (1, 729, 1152)


def test_unknown_preset():
    with pytest.raises(UserInputError, match="nonexistent"):
        MoondreamConfig.preset("nonexistent")


def _hub_file(tmp_path: Path, data: bytes, blob_name: str | None = None) -> Path:
    """A downloaded file as the hub cache holds it: snapshots/REV/model.safetensors, a link to blobs/<sha256>."""
    blob = tmp_path / "hub" / "blobs" / (blob_name or hashlib.sha256(data).hexdigest())
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = tmp_path / "hub" / "snapshots" / "rev" / "model.safetensors"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob)
    return link


def _weights_bytes(tmp_path: Path) -> bytes:
    save_file({"x": torch.arange(1000, dtype=torch.float32)}, str(tmp_path / "whole.safetensors"))
    return (tmp_path / "whole.safetensors").read_bytes()


def _download_returns(monkeypatch, file: Path) -> None:
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, revision=None, **kw: str(file))


def test_ensure_weights_checks_the_hub_hash_and_copies_a_good_download(tmp_path, monkeypatch):
    _download_returns(monkeypatch, _hub_file(tmp_path, _weights_bytes(tmp_path)))
    target = tmp_path / "out" / "model.safetensors"
    assert ensure_weights(target) == target
    assert torch.equal(load_weights_file(target)["x"], torch.arange(1000, dtype=torch.float32))
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "other bytes", "not safetensors"])
def test_a_corrupt_download_never_reaches_the_weights_path(tmp_path, monkeypatch, damage):
    whole = _weights_bytes(tmp_path)
    if damage == "truncated":  # the size its header promises is not there
        downloaded, expected = _hub_file(tmp_path, whole[: len(whole) // 2]), "bytes where its header needs"
    elif damage == "other bytes":  # the right size, but not the bytes the hub's SHA-256 names
        flipped = whole[:-1] + bytes([whole[-1] ^ 1])
        downloaded, expected = _hub_file(tmp_path, flipped, hashlib.sha256(whole).hexdigest()), "SHA-256"
    else:
        downloaded, expected = _hub_file(tmp_path, b"<html>rate limited</html>"), "bytes, less than its"
    _download_returns(monkeypatch, downloaded)
    target = tmp_path / "out" / "model.safetensors"
    with pytest.raises(UserInputError) as err:
        ensure_weights(target)
    message = str(err.value)
    assert expected in message and str(downloaded) in message and f"delete {downloaded.resolve()}" in message
    assert "\n" not in message
    assert not target.parent.exists()  # refused before anything was written


def test_a_copy_cut_short_by_a_full_disk_leaves_no_weights_file(tmp_path, monkeypatch):
    _download_returns(monkeypatch, _hub_file(tmp_path, _weights_bytes(tmp_path)))

    def copy_half_then_fill_the_disk(source, destination):
        Path(destination).write_bytes(Path(source).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfile", copy_half_then_fill_the_disk)
    target = tmp_path / "out" / "model.safetensors"
    with pytest.raises(DiskFull, match=f"while writing {target}; free some space"):
        ensure_weights(target)
    assert not list(target.parent.iterdir())


def test_a_short_copy_is_caught_before_the_rename(tmp_path, monkeypatch):
    _download_returns(monkeypatch, _hub_file(tmp_path, _weights_bytes(tmp_path)))
    monkeypatch.setattr(shutil, "copyfile", lambda s, d: Path(d).write_bytes(Path(s).read_bytes()[:-4]))
    target = tmp_path / "out" / "model.safetensors"
    with pytest.raises(UserInputError, match=f"writing {target} from the download gave a short file"):
        ensure_weights(target)
    assert not list(target.parent.iterdir())


def test_a_truncated_shard_leaves_no_merged_file(tmp_path, monkeypatch):
    for name, value in (("a.safetensors", torch.zeros(300)), ("b.safetensors", torch.ones(300))):
        save_file({f"model.{name[0]}": value}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.a": "a.safetensors", "model.b": "b.safetensors"}}))
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes()[:-8])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: str(tmp_path / name))
    target = tmp_path / "out" / "model_md3.safetensors"
    with pytest.raises(UserInputError, match="b.safetensors is corrupt .*bytes where its header needs"):
        ensure_weights(target, CHECKPOINTS["md3"])
    assert not target.parent.exists()
