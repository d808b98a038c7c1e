"""Model configuration as plain dataclasses.

`MoondreamConfig()` is the released Moondream 2; `MoondreamConfig.preset(name)` gives the other named
sizes. Every shape in the model is read from here, so a small config builds a small model with the
same structure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TextMoeConfig:
    """Mixture-of-experts MLP used by the later text blocks of Moondream 3."""

    num_experts: int = 64
    start_layer: int = 4
    experts_per_token: int = 8
    expert_inner_dim: int = 1024


@dataclass
class TextConfig:
    dim: int = 2048
    ff_dim: int = 8192
    n_layers: int = 24
    vocab_size: int = 51200
    max_context: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 32
    rope_theta: float = 10000.0
    moe: TextMoeConfig | None = None  # None: every block has a dense MLP (Moondream 2)
    use_tau: bool = False  # Moondream 3's learned per-head, per-token scaling of q and v

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class VisionConfig:
    enc_dim: int = 1152
    enc_patch_size: int = 14
    enc_n_layers: int = 27
    enc_ff_dim: int = 4304
    enc_n_heads: int = 16
    proj_out_dim: int = 2048
    crop_size: int = 378
    in_channels: int = 3
    max_crops: int = 12
    overlap_margin: int = 4
    proj_inner_dim: int = 8192

    @property
    def grid_size(self) -> int:
        """Patches per crop side (27 for the real model); not the number of layers."""
        return self.crop_size // self.enc_patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2


@dataclass
class RegionConfig:
    dim: int = 2048
    coord_feat_dim: int = 256
    coord_out_dim: int = 1024
    size_feat_dim: int = 512
    size_out_dim: int = 2048
    inner_dim: int | None = 8192  # None: single-Linear decoders (Moondream 3)
    use_layernorm: bool = False  # newer Moondream 3 revisions normalise before decoding


@dataclass
class TokenizerConfig:
    bos_id: int = 0
    eos_id: int = 0
    answer_id: int = 3
    thinking_id: int = 4
    coord_id: int = 5
    size_id: int = 6
    start_ground_points_id: int = 7
    end_ground_id: int = 9
    templates: dict = field(
        default_factory=lambda: {
            "caption": {
                "short": [1, 32708, 2, 12492, 3],
                "normal": [1, 32708, 2, 6382, 3],
                "long": [1, 32708, 2, 4059, 3],
            },
            "query": {"prefix": [1, 15381, 2], "suffix": [3]},
            "detect": {"prefix": [1, 7235, 476, 2], "suffix": [3]},
            "point": {"prefix": [1, 2581, 2], "suffix": [3]},
        }
    )
    # Where the tokenizer comes from: a hub repo id or a local tokenizer.json path. "builtin" is the
    # small byte-level tokenizer this project builds itself (random-init presets only).
    source: str = "moondream/starmie-v1"


@dataclass
class MoondreamConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Whether "another object?" after an object is an argmax over the whole vocabulary (Moondream 2)
    # or only over {coord_id, eos_id} (Moondream 3). Right after the prompt both read the whole vocabulary.
    restrict_stop_decision: bool = False
    max_objects: int = 50
    top_p: float = 0.3  # query sampling default
    # Moondream 2's query prompt ends with the answer marker twice (…3, 3); Moondream 3 fixed it.
    repeat_answer_marker: bool = True
    name: str = "md2"

    @property
    def prefix_len(self) -> int:
        """BOS plus one token per image patch: the bidirectional part of every sequence."""
        return 1 + self.vision.n_patches

    @staticmethod
    def preset(name: str) -> "MoondreamConfig":
        if name not in PRESETS:
            from .errors import UserInputError

            raise UserInputError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def builtin_tokenizer(vocab_size: int = 8192) -> TokenizerConfig:
    """Random-init presets: the builtin byte tokenizer. Task-word ids beyond the small vocabulary
    (query 15381, caption 32708 and 12492) are taken modulo the vocabulary size."""
    tok = TokenizerConfig(source="builtin")
    for task in tok.templates.values():
        for ids in task.values():
            ids[:] = [i % vocab_size for i in ids]
    return tok


def _md2() -> MoondreamConfig:
    return MoondreamConfig()


def _tiny() -> MoondreamConfig:
    """Same structure as Moondream 2, random init, small enough for a CPU detect in well under 1 s.

    The sizes match the recorded golden outputs of the original code (`tests/fixtures/golden-md2-tiny`).
    """
    return MoondreamConfig(
        text=TextConfig(dim=128, ff_dim=512, n_layers=2, vocab_size=8192, n_heads=2, n_kv_heads=2),
        vision=VisionConfig(
            enc_dim=64, enc_n_layers=2, enc_ff_dim=256, enc_n_heads=1, proj_out_dim=128, proj_inner_dim=256
        ),
        region=RegionConfig(dim=128, inner_dim=256),
        tokenizer=builtin_tokenizer(),
        name="tiny",
    )


def _tiny_shapes() -> MoondreamConfig:
    """The shipped base model's size (`models/tiny-shapes.safetensors`): pretrained from scratch on the
    synthetic shapes world by `pretrain_base.py` in under an hour on a 2-core CPU.

    144-pixel crops of 12-pixel patches (a 12 x 12 grid, 145 prefix tokens) keep a step cheap on a
    CPU; at most 4 local crops, so larger images still tile.
    """
    return MoondreamConfig(
        text=TextConfig(dim=192, ff_dim=768, n_layers=4, vocab_size=4096, n_heads=4, n_kv_heads=4),
        vision=VisionConfig(
            enc_dim=128, enc_patch_size=12, enc_n_layers=4, enc_ff_dim=512, enc_n_heads=4, proj_out_dim=192,
            crop_size=144, max_crops=4, overlap_margin=2, proj_inner_dim=768,
        ),
        # The region LayerNorm of newer Moondream 3 revisions: trained from scratch, the residual stream
        # grows (norm ~100 here) and un-normalised it drove every coordinate-decoder unit dead.
        region=RegionConfig(dim=192, inner_dim=384, use_layernorm=True),
        tokenizer=builtin_tokenizer(4096),
        max_objects=20,
        name="tiny-shapes",
    )


def _small() -> MoondreamConfig:
    """About 30M parameters: big enough for benchmarks to mean something on a CPU."""
    return MoondreamConfig(
        text=TextConfig(dim=384, ff_dim=1536, n_layers=6, vocab_size=8192, n_heads=6, n_kv_heads=6),
        vision=VisionConfig(
            enc_dim=256, enc_n_layers=4, enc_ff_dim=1024, enc_n_heads=4, proj_out_dim=384, proj_inner_dim=1536
        ),
        region=RegionConfig(dim=384, inner_dim=1536),
        tokenizer=builtin_tokenizer(),
        name="small",
    )


def _medium() -> MoondreamConfig:
    """About 250M parameters."""
    return MoondreamConfig(
        text=TextConfig(dim=1024, ff_dim=4096, n_layers=12, vocab_size=8192, n_heads=16, n_kv_heads=16),
        vision=VisionConfig(
            enc_dim=512, enc_n_layers=8, enc_ff_dim=2048, enc_n_heads=8, proj_out_dim=1024, proj_inner_dim=4096
        ),
        region=RegionConfig(dim=1024, inner_dim=4096),
        tokenizer=builtin_tokenizer(),
        name="medium",
    )


def _as_md3(base: MoondreamConfig, moe: TextMoeConfig, name: str) -> MoondreamConfig:
    """Moondream 3 is Moondream 2 with these differences; vision, tokenizer and templates are shared."""
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, max_context=4096, rope_theta=1.5e6, moe=moe, use_tau=True),
        region=dataclasses.replace(base.region, inner_dim=None),
        restrict_stop_decision=True,
        max_objects=150,
        top_p=0.9,
        repeat_answer_marker=False,
        name=name,
    )


def _md3() -> MoondreamConfig:
    """The released Moondream 3 preview: 9.27B parameters, 64-expert MoE in blocks 4-23."""
    return _as_md3(_md2(), TextMoeConfig(), "md3")


def _tiny_md3() -> MoondreamConfig:
    """Moondream 3's structure at `tiny` size: one dense block, then two 8-expert top-2 MoE blocks."""
    base = _tiny()
    base.text.n_layers = 3
    moe = TextMoeConfig(num_experts=8, start_layer=1, experts_per_token=2, expert_inner_dim=128)
    return _as_md3(base, moe, "tiny-md3")


PRESETS = {
    "md2": _md2,
    "tiny": _tiny,
    "tiny-shapes": _tiny_shapes,
    "small": _small,
    "medium": _medium,
    "md3": _md3,
    "tiny-md3": _tiny_md3,
}
