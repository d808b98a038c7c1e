"""Training and evaluation under torchrun: 2 CPU processes (gloo) must do what one process does.

Each torchrun launch starts two fresh Python processes on the tiny preset; the single-process runs
are in-process calls of the same `main`. LoRA dropout is 0 so the runs draw no random numbers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datasets import write_synthetic_coco
from evaluate import EvaluateConfig
from evaluate import main as evaluate_main
from sft_trainer_detect_grad import DetectGradConfig
from sft_trainer_detect_grad import main as detect_grad_main

REPO = Path(__file__).resolve().parents[1]
FINAL = "moondream_lora_finetune_detect_grad.safetensors"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_synthetic_coco(root, n_train=13, n_valid=3, n_test=2, seed=1, image_size=96, max_objects=3)  # 11 sequences an epoch
    return root


def flags(shapes: Path, output_dir: Path, **overrides) -> dict:
    return dict(model="tiny", dataset=str(shapes), output_dir=str(output_dir), lr=1e-3, lora_rank=4, lora_alpha=8,
                lora_dropout=0.0, max_objects=3, num_pictures=0, eval_interval=2, negatives_per_positive=0.5,
                **overrides)


def torchrun(script: str, options: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    argv = [f"--{k}={v}" for k, v in options.items() if v is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(REPO / script), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: dict, b: dict, atol: float = 2e-4) -> None:
    """Equal to a fifth of one step at lr 1e-3 (a tenth failed now and then on FSDP runs, at 1.04e-4): AdamW divides by the gradient's running RMS, so float
    rounding in near-zero gradient entries moves weights by more than the rounding itself. A wrong
    gradient scale hides from this (AdamW is scale-free), hence the grad-norm checks beside it."""
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, float((a[k] - b[k]).abs().max()))


def log(output_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (output_dir / f"log_{name}.jsonl").read_text().splitlines()]


def loss_and_grad_norm(records: list[dict]) -> list[float]:
    return [v for r in records if r["event"] == "train" for v in (r["loss"], r["grad_norm"])]


def test_accumulation_is_one_big_batch(shapes, tmp_path):
    """Two windows of 2 sequences weigh every action as one batch of 4 does."""
    big = detect_grad_main(DetectGradConfig(**flags(shapes, tmp_path / "big", batch_size=4, grad_accum_steps=1, max_steps=2)))
    accumulated = detect_grad_main(DetectGradConfig(**flags(shapes, tmp_path / "acc", batch_size=2, grad_accum_steps=2,
                                                            max_steps=2)))
    assert_same_weights(weights(Path(big["final_path"])), weights(Path(accumulated["final_path"])))
    logged = [loss_and_grad_norm(log(Path(s["final_path"]).parent, "detect_grad")) for s in (big, accumulated)]
    assert logged[0] == pytest.approx(logged[1], rel=1e-4)


def test_two_processes_train_what_one_process_trains(shapes, tmp_path):
    single = detect_grad_main(DetectGradConfig(**flags(shapes, tmp_path / "one", batch_size=4, max_steps=3)))
    torchrun("sft_trainer_detect_grad.py", flags(shapes, tmp_path / "two", batch_size=2, max_steps=3))
    assert_same_weights(weights(Path(single["final_path"])), weights(tmp_path / "two" / FINAL))
    one, two = log(tmp_path / "one", "detect_grad"), log(tmp_path / "two", "detect_grad")
    assert sum(r["event"] == "config" for r in two) == 1  # rank 0 alone writes the log
    evals = [[r for r in records if r["event"] == "eval" and r["step"] == 0][0] for records in (one, two)]
    assert {k: evals[0][k] for k in ("f1", "n_pred", "reward")} == {k: evals[1][k] for k in ("f1", "n_pred", "reward")}
    logged = [loss_and_grad_norm(records) for records in (one, two)]
    assert logged[0] == pytest.approx(logged[1], rel=1e-4)  # the loss and gradient of the global batch


def test_a_run_resumes_on_another_number_of_processes(shapes, tmp_path):
    first = tmp_path / "first"
    detect_grad_main(DetectGradConfig(**flags(shapes, first, batch_size=4, max_steps=2)))
    resume = first / "resume_detect_grad.pt"
    on_one = detect_grad_main(DetectGradConfig(**flags(shapes, tmp_path / "one", batch_size=4, max_steps=4,
                                                       resume=str(resume))))
    torchrun("sft_trainer_detect_grad.py", flags(shapes, tmp_path / "two", batch_size=2, max_steps=4, resume=str(resume)))
    assert_same_weights(weights(Path(on_one["final_path"])), weights(tmp_path / "two" / FINAL))
    steps = [r["step"] for r in log(tmp_path / "two", "detect_grad") if r["event"] == "train"]
    assert steps == [3, 4]


FULL_TEXT = dict(use_lora=False, train_text=True)  # the full fine-tune FSDP is for


def test_fsdp_trains_what_one_process_trains(shapes, tmp_path):
    """Sharded parameters, gradients and optimizer state give the weights of one unsharded process, and
    its evaluations (gathered model) and checkpoints (gathered tensors) are the same too.

    An epoch is 11 sequences: a step is a batch of 10 and one of 1, so process 1 has nothing in the
    second and still has to run the decoder for FSDP's collectives."""
    full_final = "moondream_finetune_detect_grad.safetensors"
    single = detect_grad_main(DetectGradConfig(**flags(shapes, tmp_path / "one", batch_size=10, max_steps=3, **FULL_TEXT)))
    torchrun("sft_trainer_detect_grad.py", flags(shapes, tmp_path / "two", batch_size=5, max_steps=3, fsdp=True,
                                                 grad_checkpointing=True, **FULL_TEXT))
    assert_same_weights(weights(Path(single["final_path"])), weights(tmp_path / "two" / full_final))
    one, two = log(tmp_path / "one", "detect_grad"), log(tmp_path / "two", "detect_grad")
    assert loss_and_grad_norm(one) == pytest.approx(loss_and_grad_norm(two), rel=1e-4)
    evals = [[(r["step"], r["f1"], r["n_pred"], r["reward"]) for r in records if r["event"] == "eval"] for records in (one, two)]
    assert len(evals[0]) == 4 and evals[0] == pytest.approx(evals[1])  # steps 0, 2, final, test


def test_an_fsdp_run_resumes_in_one_process(shapes, tmp_path):
    """The resume file of a sharded run holds whole tensors and optimizer state keyed by name."""
    torchrun("sft_trainer_detect_grad.py", flags(shapes, tmp_path / "two", batch_size=2, max_steps=2, fsdp=True,
                                                 **FULL_TEXT))
    resumed = detect_grad_main(DetectGradConfig(**flags(shapes, tmp_path / "resumed", batch_size=4, max_steps=4,
                                                        resume=str(tmp_path / "two" / "resume_detect_grad.pt"),
                                                        **FULL_TEXT)))
    straight = detect_grad_main(DetectGradConfig(**flags(shapes, tmp_path / "one", batch_size=4, max_steps=4, **FULL_TEXT)))
    assert_same_weights(weights(Path(straight["final_path"])), weights(Path(resumed["final_path"])))


def test_grpo_shares_groups_between_processes(shapes, tmp_path):
    options = flags(shapes, tmp_path, batch_size=2, max_steps=2, num_rollouts=3, inject_ground_truth=True,
                    inject_threshold=1.01)
    torchrun("grpo_trainer.py", options)
    steps = [r for r in log(tmp_path, "grpo") if r["event"] == "train"]
    assert [r["groups"] for r in steps] == [4, 4]  # 2 samples on each of 2 processes
    assert all(r["updates"] == 1 and r["injected"] == 4 for r in steps)
    assert (tmp_path / "moondream_lora_finetune_grpo.safetensors").is_file()


def test_evaluate_shards_images_and_reports_the_single_process_numbers(shapes, tmp_path):
    options = dict(model="tiny", dataset=str(shapes), split="train", max_objects=3, num_pictures=2)
    single = evaluate_main(EvaluateConfig(**options, out=str(tmp_path / "one")))
    torchrun("evaluate.py", {**options, "out": str(tmp_path / "two")})
    sharded = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert {k: sharded[k] for k in ("f1", "map", "n_pred", "n_gt", "reward", "n_images")} == \
        {k: single[k] for k in ("f1", "map", "n_pred", "n_gt", "reward", "n_images")}
    one, two = (json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("one", "two"))
    assert [r["image"] for r in two] == [r["image"] for r in one]  # gathered back into the split's order
    boxes = [[[box for box, _ in found] for found in r["predictions"].values()] for r in (*one, *two)]
    assert boxes[: len(one)] == boxes[len(one):]
    assert len(list((tmp_path / "two" / "pictures").glob("*.png"))) >= 2  # rank 0 drew them
