"""Export a fine-tuned checkpoint as one complete model: adapters merged into the base, one file.

    python export.py --checkpoint=moondream_lora_finetune_detect_grad.safetensors --out=my-model
    python export.py --checkpoint=FILE --out=DIR --dtype=fp16 --layout=hf --push_to_hub=user/my-model

Writes DIR/model.safetensors, which loads with a plain strict `load_state_dict` into a fresh model
(`plain`: our module names, as `state_dict()` saves them; `hf`: the hub's `model.`-prefixed names),
and DIR/README.md, a model card with the base, data, flags and metrics recorded in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.cli import flag, run_cli
from finetune.export_model import DTYPES, LAYOUTS, export_checkpoint
from finetune.validation import check_field_types, check_output_dir, require


@dataclass
class ExportConfig:
    checkpoint: str = flag("", "fine-tuned checkpoint written by a trainer (adapters or a complete model)")
    out: str = flag("export", "directory for model.safetensors and the model card README.md")
    dtype: str = flag("bf16", "bf16, fp16 or fp32: precision of the exported weights")
    layout: str = flag("plain", "plain (our module names, as state_dict() saves them) or hf (the hub's model.-prefixed "
                                "names)")
    weights: str | None = flag(None, "base weights the adapters were trained on, when not where the checkpoint records "
                                     "them")
    push_to_hub: str | None = flag(None, "also upload the folder to this Hugging Face repo (e.g. user/my-model; needs "
                                         "a login)")

    def __post_init__(self):
        check_field_types(self)
        require(self, "checkpoint", bool(self.checkpoint), "pass the fine-tuned .safetensors to export")
        require(self, "dtype", self.dtype in DTYPES, f"use one of {', '.join(DTYPES)}")
        require(self, "layout", self.layout in LAYOUTS, f"use one of {', '.join(LAYOUTS)}")
        check_output_dir("out", self.out)


def main(config: ExportConfig) -> Path:
    return export_checkpoint(config)


if __name__ == "__main__":
    run_cli(ExportConfig, main, __doc__.split("\n\n")[0])
