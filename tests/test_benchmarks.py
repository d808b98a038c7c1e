"""The performance suite runs end to end and reports every configuration (no timing thresholds: the
numbers depend on the machine)."""

from __future__ import annotations

import json

from benchmarks import run_all


def test_suite_writes_a_row_for_every_configuration(tmp_path):
    run_all.main(presets="tiny", boxes="1,5", classes="1,4", images="1,2", steps=1, warmup=1, max_objects=2,
                 device="cpu", out=str(tmp_path))

    report = json.loads((tmp_path / "suite_cpu.json").read_text())
    markdown = (tmp_path / "suite_cpu.md").read_text()
    training = {(r["trainer"], r["boxes"]): r for r in report["training"]}
    assert set(training) == {(t, n) for t in ("detect_grad", "sft", "grpo") for n in (1, 5)}
    for (trainer, n), row in training.items():
        assert row["preset"] == "tiny" and row["seconds_per_step"] > 0 and row["peak_extra_mib"] > 0
        assert row["images_per_second"] > 0 and row["tokens"] > 0
        assert f"| {trainer} | tiny | {n} |" in markdown
    detect = {(r["classes"], r["images"]): r for r in report["detect"]}
    assert set(detect) == {(c, b) for c in (1, 4) for b in (1, 2)}
    for (classes, images), row in detect.items():
        assert row["separate_s_per_image"] > 0 and row["batched_s_per_image"] > 0
        assert row["speedup"] > 0 and row["images_per_second"] > 0
        assert f"| tiny | {images} | {classes} |" in markdown
    assert report["models"][0]["params"] > 0 and report["environment"]["threads"] >= 1
    assert report["command"].endswith(f"--out={tmp_path}") and report["command"] in markdown
    assert "Rollout sampling is not included" in markdown
