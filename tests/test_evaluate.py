"""evaluate.py end to end on the tiny preset: metrics.json, pictures, --compare, bad flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from evaluate import EvaluateConfig, main
from finetune.base_model import build_model
from finetune.checkpoint import save_weights
from finetune.lora import inject_lora_into_model, lora_modules
from moondream2.errors import UserInputError

ROOT = Path(__file__).resolve().parent.parent
CHESS = str(ROOT / "datasets" / "chess-pieces")
REQUIRED = {"f1", "precision", "recall", "map", "map50", "n_images", "n_gt", "n_pred", "per_class"}


def test_bundled_test_split_writes_metrics_and_pictures(tmp_path):
    report = main(EvaluateConfig(model="tiny", dataset=CHESS, split="test", out=str(tmp_path), limit=2,
                                 num_pictures=2, max_objects=3))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert REQUIRED <= written.keys()
    assert written["n_images"] == 2 and written["f1"] == report["f1"]
    assert written["n_gt"] > 0 and 0.0 <= written["f1"] <= 1.0
    pictures = sorted(p.name for p in (tmp_path / "pictures").glob("*.png"))
    assert len(pictures) == 3 and "contact_sheet.png" in pictures


def fake_finetune(path: Path) -> None:
    """A checkpoint as a trainer writes it: nonzero adapters and a changed region head, with settings."""
    model = build_model("tiny", None, None, "cpu", 0)
    inject_lora_into_model(model, rank=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    for module in lora_modules(model):
        module.lora_B.data = torch.randn(module.lora_B.shape, generator=g) * 0.5
    model.region.coord_decoder.fc2.bias.data += torch.randn(model.region.coord_decoder.fc2.bias.shape, generator=g)
    tensors = {n: p for n, p in model.named_parameters() if "lora_" in n or n.startswith("region.")}
    save_weights(model, path, {"lora": model.lora_settings.to_dict(), "trainer": "test"}, tensors)


def test_compare_reports_base_finetuned_and_their_difference(tmp_path):
    checkpoint = tmp_path / "adapter.safetensors"
    fake_finetune(checkpoint)
    common = dict(model="tiny", dataset=CHESS, split="test", limit=2, num_pictures=2, max_objects=4)
    plain = main(EvaluateConfig(**common, out=str(tmp_path / "plain")))
    tuned = main(EvaluateConfig(**common, out=str(tmp_path / "tuned"), lora=str(checkpoint)))
    both = main(EvaluateConfig(**common, out=str(tmp_path / "both"), lora=str(checkpoint), compare=True))
    assert both["base"]["n_pred"] == plain["n_pred"] and both["base"]["f1"] == plain["f1"]
    assert both["n_pred"] == tuned["n_pred"] and both["f1"] == tuned["f1"]
    predictions = {name: (tmp_path / name / "predictions.json").read_text() for name in ("plain", "tuned", "both")}
    assert predictions["both"] == predictions["tuned"] != predictions["plain"]  # the checkpoint was applied
    assert both["delta"]["n_pred"] == tuned["n_pred"] - plain["n_pred"]
    assert both["delta"]["f1"] == pytest.approx(tuned["f1"] - plain["f1"])
    singles = sorted((tmp_path / "plain" / "pictures").glob("*.png"))
    pairs = sorted((tmp_path / "both" / "pictures").glob("*.png"))
    assert [p.name for p in pairs] == [p.name for p in singles] and len(pairs) == 3  # two images, one sheet
    for single, pair in zip(singles, pairs):
        if single.name != "contact_sheet.png":  # base | fine-tuned of the same image, with a small gap
            assert 2 * Image.open(single).width < Image.open(pair).width < 2.1 * Image.open(single).width


def test_compare_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="--compare=True needs --lora"):
        main(EvaluateConfig(model="tiny", dataset=CHESS, out=str(tmp_path), compare=True))


@pytest.mark.parametrize("args, expected", [
    (["--split=nope"], "nope"),
    (["--dataset=/nonexistent/data"], "/nonexistent/data"),
    (["--lora=/nonexistent/adapter.safetensors"], "/nonexistent/adapter.safetensors"),
])
def test_bad_input_gives_a_one_line_error(tmp_path, args, expected):
    run = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model=tiny", f"--out={tmp_path}",
                          "--limit=1", *args], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], run.stderr
