"""Pretrain the shipped base model (`--model=tiny-shapes`) from scratch on the synthetic shapes world.

Everything trains (vision encoder, text decoder, region head) from a random init, with soft
coordinate/size targets, on generated images of five shapes in six colours (`PRETRAIN_WORLD`; the
shapes and colours held out of it are what the quick start fine-tunes on). The result is written in
float16 with a model card holding the command, time, seed and held-out test metrics.

From scratch, the detect loss alone leaves the model guessing positions: it stays at the marginal
distribution of positions for as long as we could afford to train (1,000-1,500 steps), even when the
image tokens are made by hand to say which class and cell they hold. To name a box's x, the token that
reads it must attend to that object's image tokens, carry what it finds there to the readout, and the
readout must map it to a bin; each can only learn once the others work. Auxiliary losses on the
model's own tensors break that loop:

- `looking`: at every decision, x, y and size read, one attention head of one text block
  (`LOOK_LAYER`, head 0) is taught to put its weight on the image cells of the object being read, or
  on BOS where the answer is "stop" (the cross-entropy of its attention against those cells).
- `values`: that head's values at each image cell are taught (through a linear probe) to say where the
  cell is, so what it reads from an object's cells says where the object is. Without this a probe
  found only 14% of the x variance in the head's output, and x stayed at the marginal for 400 steps;
  with it y leaves the marginal at step 300 and x follows.
- `read`: the hidden state at every read of an object is taught (through a linear probe) the object's
  box, as sines and cosines of its centre and size (`box_code`).
- `dense` and `where`: a linear probe on every image token predicts which classes cover its cell
  and the cell's own position code, so the image tokens say what and where they are.

The probes are dropped on export and the attention needs no extra weights: the shipped model is a
plain Moondream.

    python pretrain_base.py --max_steps=1500 --schedule_steps=3200 --out=runs/pretrain-stage1.safetensors
    python pretrain_base.py --weights=runs/pretrain-stage1.safetensors --negatives_per_positive=1.5 --lr=6e-4 \
        --warmup_ratio=0.02 --max_steps=1700 --output_dir=runs/pretrain2   # 53 min in all: test F1 0.28 (models/tiny-shapes.md)
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets import DetectionSplit
from datasets.synthetic import PRETRAIN_WORLD, write_synthetic_coco
from finetune.base_model import RANDOM_INIT, SHIPPED_WEIGHTS, build_model, grid_positions
from finetune.files import atomic_write
from finetune.cli import flag, run_cli
from finetune.config import TrainConfig
from finetune.evaluation import evaluate_split, format_metrics_table
from finetune.preparation import load_data
from finetune.sequences import DECISION, W, Y, ActionBatch
from finetune.supervised import Example, TeacherForcing, train_supervised
from finetune.validation import check_output_dir
from moondream2.errors import UserInputError
from moondream2.rope import apply_rope
from moondream2.weights import load_weights_file
from safetensors.torch import save_file

HEAD = "pretrain_head"  # the auxiliary head's module name: trained, never exported
POSITION_CODE = 32  # channels of the cell position code the head predicts (sines and cosines)
BOX_CODE = 64  # channels of the box code (`box_code`) the `read` probe predicts
LOOK_LAYER = 1  # the text block whose first attention head learns to look at the object being read


@dataclass
class PretrainConfig(TrainConfig):
    model: str = "tiny-shapes"
    weights: str | None = RANDOM_INIT
    dataset: str = ""  # default: generated under output_dir
    output_dir: str = "runs/pretrain"
    lr: float = 1e-3
    epochs: int = 3
    max_steps: int | None = 3200
    batch_size: int = 16
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    use_lora: bool = False
    train_text: bool | None = True
    train_vision: bool = True
    negatives_per_positive: float = 0.5
    max_objects: int = 20
    eval_interval: int = 250
    eval_limit: int | None = 48
    num_pictures: int = 8
    bin_sigma: float = 6.0
    baseline_eval: bool = False  # a random init finds nothing, slowly
    n_train: int = flag(16000, "generated training images (pretraining shapes and colours only)")
    n_valid: int = flag(48, "generated validation images (model selection)")
    n_test: int = flag(200, "generated held-out test images (the model card's numbers)")
    out: str = flag(str(SHIPPED_WEIGHTS["tiny-shapes"]), "where the float16 base model goes; its card is written "
                                                         "beside it (.json and .md)")

    def __post_init__(self):
        super().__post_init__()
        check_output_dir("out", self.out, file=True)  # written after the whole run
        if min(self.n_train, self.n_valid, self.n_test) < 1:
            raise UserInputError("--n_train, --n_valid and --n_test must be at least 1")


def box_cells(box: tuple[float, float, float, float], grid: int) -> torch.Tensor:
    """(grid * grid,) bool, row-major: the cells whose centre the box covers, and always the cell
    holding the box's centre (so an object smaller than a cell still marks one)."""
    x0, y0, x1, y1 = box
    centres = (torch.arange(grid) + 0.5) / grid
    cells = ((centres >= y0) & (centres < y1))[:, None] & ((centres >= x0) & (centres < x1))[None, :]
    cells[min(int((y0 + y1) / 2 * grid), grid - 1), min(int((x0 + x1) / 2 * grid), grid - 1)] = True
    return cells.flatten()


def cell_labels(boxes_by_class: dict, class_names: list[str], grid: int) -> torch.Tensor:
    """(classes, grid * grid) 1 where a box of the class marks the cell (`box_cells`), else 0."""
    labels = torch.zeros(len(class_names), grid * grid)
    for k, name in enumerate(class_names):
        for box in boxes_by_class.get(name, []):
            labels[k] += box_cells(box, grid)
    return labels.clamp(max=1)


def box_code(boxes: torch.Tensor) -> torch.Tensor:
    """(..., BOX_CODE) sines and cosines of an object's centre x, y, width and height (each in [0, 1])
    at eight frequencies, from one period over two images to one per 1/64 image."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    values = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    angles = values[..., None] * torch.pi * 2.0 ** torch.arange(BOX_CODE // 8)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def head_attention(block, inputs: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                   rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(K, T) log attention weights of head 0 of `block` for the queries at (rows[k], cols[k]).

    Recomputed from the block's inputs exactly as its attention computes them (the same norm,
    projection, rotary positions, scale and mask); the model's own forward uses fused attention,
    which does not return the weights.
    """
    attention = block.attn
    q, k, _ = attention.qkv(block.ln(inputs)).split(
        [attention.n_heads * attention.head_dim] + 2 * [attention.n_kv_heads * attention.head_dim], dim=-1)
    q = apply_rope(q[..., : attention.head_dim].unsqueeze(1), positions, attention.rope_theta)[:, 0]
    k = apply_rope(k[..., : attention.head_dim].unsqueeze(1), positions, attention.rope_theta)[:, 0]
    scores = torch.einsum("kd,ktd->kt", q[rows, cols], k[rows]) / attention.head_dim**0.5
    return scores.masked_fill(~mask[rows, 0, cols], float("-inf")).float().log_softmax(-1)


class DenseShapeLoss(TeacherForcing):
    """The detect loss plus the auxiliary losses of the module docstring. `split` gives each image's boxes."""

    def __init__(self, model, features, prefixes, bin_sigma: float, *, split: DetectionSplit):
        # Whole sequences, never a shared prefix: the auxiliary losses read the image tokens' states.
        super().__init__(model, features, None, bin_sigma)
        self.split = split
        self.records = {record.path: record for record in split.images}
        grid, dim = model.config.vision.grid_size, model.config.text.dim
        self.block = model.text.blocks[LOOK_LAYER]
        self.positions = grid_positions(grid, POSITION_CODE).to(model.device)  # (cells, code)
        probes = torch.nn.ModuleDict({
            "cells": torch.nn.Linear(dim, len(self.split.class_names) + POSITION_CODE),
            "head_values": torch.nn.Linear(self.block.attn.head_dim, POSITION_CODE),
            "read": torch.nn.Linear(dim, BOX_CODE),
        })
        model.add_module(HEAD, probes.to(model.device))
        self.block_inputs: tuple = ()
        # Keeps the block's (inputs, positions, mask) of the last forward for `looking` and `values`.
        self.block.register_forward_pre_hook(lambda module, inputs: setattr(self, "block_inputs", inputs[:3]))

    def __call__(self, batch: list[Example]) -> tuple[torch.Tensor, float, dict[str, float]]:
        images = self.encode(batch)
        sequences = self.actions(batch, images)
        hidden = self.model.hidden_states(sequences.embeds).flatten(0, 1)
        loss, weight, parts = self.sequence_loss(sequences, hidden)
        grid, length = self.model.config.vision.grid_size, sequences.embeds.shape[1]
        probes = getattr(self.model, HEAD)
        reads, on_target, read_boxes, has_object = look_targets(batch, sequences, grid, length)
        extra = {"looking": self.looking(reads, on_target)}

        out = torch.stack([probes["cells"](features) for features in images.values()]).float()
        logits, position = out.split([len(self.split.class_names), POSITION_CODE], dim=-1)
        labels = torch.stack([cell_labels(self.records[path].boxes_by_class, self.split.class_names, grid)
                              for path, _ in images]).transpose(1, 2).to(out.device)
        # Summed over classes / code channels, averaged over cells: each map weighs like one action.
        extra["dense"] = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(-1).mean()
        extra["where"] = (position - self.positions).pow(2).sum(-1).mean()

        # The looking head's values at each image cell say where the cell is (so what it reads from
        # an object's cells says where they are), and what the model holds at each read says the
        # box of the object it reads.
        values = probes["head_values"](self.head_values()[:, 1 : 1 + grid * grid]).float()
        extra["values"] = (values - self.positions).pow(2).sum(-1).mean()
        at = reads[has_object]
        extra["read"] = _code_error(probes["read"](hidden[at]).float(), read_boxes[has_object].to(out.device))
        return loss + sum(extra.values()), weight, {
            **parts, **{k: float(v.detach()) for k, v in extra.items()}}

    def head_values(self) -> torch.Tensor:
        """(B, T, head_dim) the values of the looking head (head 0 of block LOOK_LAYER)."""
        inputs = self.block_inputs[0]
        attention = self.block.attn
        v = attention.qkv(self.block.ln(inputs))[..., -attention.n_kv_heads * attention.head_dim:]
        return v[..., : attention.head_dim]

    def looking(self, reads: torch.Tensor, on_target: torch.Tensor) -> torch.Tensor:
        """Mean over reads of -log(the looking head's attention on the cells `look_targets` gives)."""
        inputs, positions, mask = self.block_inputs
        length = inputs.shape[1]
        logp = head_attention(self.block, inputs, positions, mask, reads // length, reads % length)
        return -logp.masked_fill(~on_target.to(logp.device), float("-inf")).logsumexp(-1).mean()


def _code_error(predicted: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared error against `box_code`, summed over channels and divided by 8:
    the finest frequencies stay noise for long, and at full weight their gradient would crowd out
    the detect loss's under the clipped norm. Zero for no rows."""
    if predicted.shape[0] == 0:
        return predicted.sum()
    return (predicted - box_code(boxes)).pow(2).sum(-1).mean() / 8


def look_targets(batch: list[Example], sequences: ActionBatch, grid: int, length: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """At every decision, x, y and size read: (K,) its flat position, (K, length) bool where the
    looking head should attend (the next object's image cells, `box_cells`, after BOS in slot 0, or
    BOS itself where the answer is "stop"), (K, 4) the box read (zeros at a stop) and (K,) bool
    whether there is one."""
    reads, targets, boxes = [], [], []
    for b, example in enumerate(batch):
        mine = sequences.sequence == b
        for kind in (DECISION, Y, W):  # x is read where its object's "continue" decision is
            for i, read in enumerate(sequences.read_at[mine & (sequences.kind == kind)].tolist()):
                cells = torch.zeros(length, dtype=torch.bool)
                if i < len(example.boxes):
                    cells[1 : 1 + grid * grid] = box_cells(example.boxes[i], grid)
                else:
                    cells[0] = True
                reads.append(read)
                targets.append(cells)
                boxes.append(example.boxes[i] if i < len(example.boxes) else None)
    device = sequences.read_at.device
    has_object = torch.tensor([box is not None for box in boxes], device=device)
    table = torch.tensor([box or (0.0, 0.0, 0.0, 0.0) for box in boxes], dtype=torch.float32)
    return torch.tensor(reads, device=device), torch.stack(targets), table, has_object


def generate_data(config: PretrainConfig) -> Path:
    """The pretraining dataset under output_dir, written once (the JSON of each split comes last)."""
    root = Path(config.output_dir) / "shapes-pretrain"
    if not (root / "test" / "_annotations.coco.json").is_file():
        write_synthetic_coco(root, config.n_train, config.n_valid, config.n_test, seed=config.seed, world=PRETRAIN_WORLD)
    return root


def export_base(config: PretrainConfig, trained_path: str) -> dict[str, torch.Tensor]:
    """The whole model (random init + trained tensors) in float16, as one strict-loadable state dict."""
    model = build_model(config.model, RANDOM_INIT, config.tokenizer, "cpu", config.seed)
    trained = {k: v for k, v in load_weights_file(trained_path).items() if not k.startswith(HEAD + ".")}
    missing, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected:
        raise UserInputError(f"{trained_path} holds tensors the {config.model} preset lacks: {unexpected[:3]}")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write(config.out, lambda tmp: save_file(state, tmp, metadata={"format": "moondream-base/1",
                                                                           "preset": config.model}))
    return state


def main(config: PretrainConfig) -> dict:
    start = time.time()
    if not config.dataset:
        config.dataset = str(generate_data(config))
    data = load_data(config)
    summary = train_supervised(config, "pretrain", task="detect", loss_class=partial(DenseShapeLoss, split=data.train))
    export_base(config, summary["best_path"] or summary["final_path"])
    minutes = (time.time() - start) / 60

    # The card's numbers come from the exported float16 file, as users load it.
    model = build_model(config.model, config.out, config.tokenizer, config.device, config.seed)
    test = evaluate_split(model, data.test, max_objects=config.max_objects, desc="test (shipped)")
    card = {
        "command": "python pretrain_base.py " + " ".join(_flags(config)),
        "minutes": round(minutes, 1),
        "threads": torch.get_num_threads(),
        "seed": config.seed,
        "world": "PRETRAIN_WORLD (datasets/synthetic.py)",
        "train_images": len(data.train.images),
        "test_images": len(data.test.images),
        "trained_weights": summary["best_path"] or summary["final_path"],
        # JSON has no NaN (the mean IoU of no matches): such a metric is null.
        "test": {k: test.metrics[k] if math.isfinite(test.metrics[k]) else None
                 for k in ("f1", "precision", "recall", "map", "map50", "mean_iou", "count_error", "n_pred", "n_gt")},
    }
    out = Path(config.out)
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2)))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(card_markdown(card)))
    print(format_metrics_table({"test (shipped fp16)": test.metrics}))
    print(f"base model: {out} ({minutes:.1f} min)")
    return card


def card_markdown(card: dict) -> str:
    """The model card a person reads: what the file is, how it was made, how well it detects."""
    test = card["test"]
    rows = "\n".join(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {'-' if v is None else v} |"
                     for k, v in test.items())
    return "\n".join([
        "# tiny-shapes: a Moondream base trained from scratch on synthetic shapes", "",
        "The `tiny-shapes` preset (`--model=tiny-shapes` loads this file, no download), float16, pretrained",
        f"by this project's own code on {card['train_images']:,} generated images of {card['world']}: five",
        "shapes (circle, square, triangle, diamond, star) in six colours on noise and gradient backgrounds.",
        "Hexagons, crosses, rings and three colours are held out for fine-tuning.", "",
        f"- command: `{card['command'].strip()}`",
        f"- time: {card['minutes']} min on {card['threads']} CPU thread(s); seed {card['seed']}",
        f"- held-out test metrics ({card['test_images']} generated test images never trained on, every class"
        " asked of every image):", "",
        "| metric | value |", "|---|---|", rows, "",
    ])


def _flags(config: PretrainConfig) -> list[str]:
    """The flags that differ from the defaults, so the card's command reproduces this run."""
    default = PretrainConfig()
    return [f"--{k}={v}" for k, v in vars(config).items() if k != "dataset" and getattr(default, k) != v]


if __name__ == "__main__":
    run_cli(PretrainConfig, main, __doc__.split("\n\n")[0])
