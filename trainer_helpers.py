"""What the trainers share, under the names the original scripts used.

The pieces live in the `finetune` package (one module each); this module gathers the public ones so
notebooks can keep writing `from trainer_helpers import inject_lora_into_model`.
"""

from finetune.base_model import build_model
from finetune.checkpoint import load_trained_weights, save_weights
from finetune.evaluation import evaluate_split
from finetune.inference import load_base, load_finetuned
from finetune.lora import LoRALinear, adapters_disabled, inject_lora_into_model, merge_lora
from finetune.metrics import DetectionMetrics, PointMetrics, box_iou, match_boxes, match_points
from finetune.rewards import count_mix_reward, f1_reward, get_reward, iou_match_reward
from finetune.sequences import action_logprobs, boxes_to_target, build_action_batch, supervised_loss

__all__ = [
    "DetectionMetrics",
    "LoRALinear",
    "PointMetrics",
    "action_logprobs",
    "adapters_disabled",
    "box_iou",
    "boxes_to_target",
    "build_action_batch",
    "build_model",
    "count_mix_reward",
    "evaluate_split",
    "f1_reward",
    "get_reward",
    "inject_lora_into_model",
    "iou_match_reward",
    "load_base",
    "load_finetuned",
    "load_trained_weights",
    "match_boxes",
    "match_points",
    "merge_lora",
    "save_weights",
    "supervised_loss",
]
