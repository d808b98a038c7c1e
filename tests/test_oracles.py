"""Oracles for the core mappings: every expected value is worked by hand or taken from the formulas of
the fact sheet (docs/moondream2-architecture.md §5), never computed with the function under test.

Coordinates: bin = clamp(round(c * n), 0, n - 1), value = bin / n (n = 1024 bins).
Sizes: value = 2^((bin / (n - 1)) * 10 - 10), bin = clamp(round((log2(max(s, 2^-10)) + 10) / 10 * (n - 1))).
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from finetune.grpo_loss import ppo_loss
from finetune.lora import LoRALinear
from finetune.metrics import DetectionMetrics, PointMetrics, box_iou, match_boxes, match_points
from moondream2.decoding import RegionTrace, trace_to_objects
from moondream2.region import bin_to_coord, bin_to_size, coord_to_bin, size_to_bin

N = 1024
HALF_BIN = 0.5 / N


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here on one thread (see conftest)."""


def coord_bin(c: float) -> int:
    return int(coord_to_bin(torch.tensor([c]), N)[0])


def size_bin(s: float) -> int:
    return int(size_to_bin(torch.tensor([s]), N)[0])


def size_of(b: int) -> float:
    """The fact sheet's size decode, in plain Python."""
    return 2.0 ** (b / 1023 * 10 - 10)


# ---- coordinate bins -------------------------------------------------------------------------------
@pytest.mark.parametrize("c, b", [(0.0, 0), (0.5, 512), (1.0, 1023), (2.0**-10, 1), (0.25, 256), (1023 / 1024, 1023)])
def test_coordinate_bin_of_hand_values(c, b):
    assert coord_bin(c) == b


@pytest.mark.parametrize("b, c", [(0, 0.0), (1, 2.0**-10), (512, 0.5), (256, 0.25), (1023, 1023 / 1024)])
def test_coordinate_of_hand_bins(b, c):
    assert bin_to_coord(torch.tensor([b]), N).item() == c  # all exact in float32


@pytest.mark.parametrize("b", [0, 1, 100, 511, 700, 1022])
def test_coordinate_bin_changes_at_the_half_bin_edge(b):
    edge = (b + 0.5) / N
    assert coord_bin(edge - 1e-6) == b
    assert coord_bin(edge + 1e-6) == b + 1


def test_coordinate_decode_of_its_bin_is_within_half_a_bin():
    c = torch.linspace(0.0, 1023.5 / N, 20001)  # above 1023.5/1024 the last bin clamps
    error = (bin_to_coord(coord_to_bin(c, N), N) - c).abs()
    assert float(error.max()) <= HALF_BIN + 1e-7


def test_every_coordinate_bin_survives_decode_then_encode():
    bins = torch.arange(N)
    assert torch.equal(coord_to_bin(bin_to_coord(bins, N), N), bins)


# ---- size bins -------------------------------------------------------------------------------------
@pytest.mark.parametrize("s, b", [(1.0, 1023), (2.0**-10, 0), (1e-6, 0), (2.0, 1023), (0.5, 921), (2.0**-9, 102)])
def test_size_bin_of_hand_values(s, b):
    # 0.5: (-1 + 10) / 10 * 1023 = 920.7 -> 921;  2^-9: 1/10 * 1023 = 102.3 -> 102
    assert size_bin(s) == b


@pytest.mark.parametrize("b", [0, 1, 102, 511, 921, 1022, 1023])
def test_size_of_hand_bins(b):
    assert bin_to_size(torch.tensor([b]), N).item() == pytest.approx(size_of(b), rel=1e-6)


def test_size_ends_are_one_1024th_and_the_whole_image():
    assert bin_to_size(torch.tensor([0, 1023]), N).tolist() == pytest.approx([2.0**-10, 1.0], rel=1e-6)


def test_every_size_bin_survives_decode_then_encode():
    bins = torch.arange(N)
    assert torch.equal(size_to_bin(bin_to_size(bins, N), N), bins)


# ---- LoRA ------------------------------------------------------------------------------------------
def test_lora_forward_is_xWt_plus_b_plus_xAB_times_alpha_over_rank():
    base = nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    lora = LoRALinear(base, rank=2, alpha=6.0, dropout=0.0)  # scale 3
    with torch.no_grad():
        lora.lora_A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # (in, r)
        lora.lora_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # (r, out)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # x W^T + b = [1.5, 1.5]; x A = [4, 5]; x A B = [4, 10]; * 6/2 = [12, 30]
    assert lora(x)[0].tolist() == pytest.approx([13.5, 31.5])
    assert lora.merged_linear()(x)[0].tolist() == pytest.approx([13.5, 31.5])


# ---- k3 KL -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("p_new, p_ref, kl, grad", [
    # k3 = r - log r - 1 with r = p_ref / p_new; d/d(log p_new) = 1 - r
    (0.5, 0.25, 0.5 - math.log(0.5) - 1, 0.5),  # policy above the reference: pushed down
    (0.25, 0.5, 2.0 - math.log(2.0) - 1, -1.0),  # below: pushed up
])
def test_k3_kl_value_and_gradient_sign(p_new, p_ref, kl, grad):
    new = torch.tensor([math.log(p_new)], requires_grad=True)
    loss, _, logs = ppo_loss(new, new.detach().clone(), torch.zeros(1), torch.zeros(1, dtype=torch.long), clip_eps=0.2,
                          ref=torch.tensor([math.log(p_ref)]), kl_beta=1.0)
    assert loss.item() == pytest.approx(kl, rel=1e-5)
    assert logs["kl"] == pytest.approx(kl, rel=1e-5)
    loss.backward()
    assert new.grad.item() == pytest.approx(grad, rel=1e-5)


# ---- detection score and mAP -----------------------------------------------------------------------
REGION = SimpleNamespace(coord_bins=N, size_bins=N)


def trace(objects: list[tuple], with_size: bool = True) -> RegionTrace:
    """One sequence; objects = (x_bin, y_bin, w_bin, h_bin, p_x, p_y, p_w, p_h, p_continue)."""
    n = len(objects)
    logprobs = [[math.log(o[4]), math.log(o[5])] + ([math.log(o[6]) + math.log(o[7])] if with_size else [])
                + [math.log(o[8])] for o in objects]
    return RegionTrace(
        n_objects=torch.tensor([n]),
        x_bins=torch.tensor([[o[0] for o in objects]]),
        y_bins=torch.tensor([[o[1] for o in objects]]),
        size_bins=torch.tensor([[[o[2], o[3]] for o in objects]]).view(1, n, 2),
        logprobs=torch.tensor([logprobs], dtype=torch.float32),
        stop_logprob=torch.zeros(1),
    )


def test_detection_score_is_p_continue_times_geometric_mean_of_location_probs():
    (box,) = trace_to_objects(trace([(512, 256, 1023, 0, 0.8, 0.5, 0.25, 1.0, 0.5)]), REGION)[0]
    assert box["score"] == pytest.approx(0.5 * (0.8 * 0.5 * 0.25 * 1.0) ** 0.25, rel=1e-5)
    h = 2.0**-10
    assert [box[k] for k in ("x_min", "y_min", "x_max", "y_max")] == pytest.approx([0.0, 0.25 - h / 2, 1.0, 0.25 + h / 2])


def test_point_score_is_p_continue_times_geometric_mean_of_x_and_y_probs():
    (point,) = trace_to_objects(trace([(300, 700, 0, 0, 0.9, 0.4, 1, 1, 0.5)], with_size=False), REGION, False)[0]
    assert point == pytest.approx({"x": 300 / 1024, "y": 700 / 1024, "score": 0.5 * (0.9 * 0.4) ** 0.5})


def test_ranking_by_the_continue_probability_decides_map():
    # A is the ground truth box but the model's location probs are lower than those of B, a false
    # positive it was unsure existed: only P(continue) ranks A first.
    w = size_of(921)
    gt = [0.5 - w / 2, 0.5 - w / 2, 0.5 + w / 2, 0.5 + w / 2]
    a = (512, 512, 921, 921, 0.5, 0.5, 0.5, 0.5, 0.9)  # score 0.9 * 0.5 = 0.45
    b = (100, 100, 0, 0, 0.6, 0.6, 0.6, 0.6, 0.1)  # score 0.1 * 0.6 = 0.06 (0.6 > 0.5 without P(continue))
    objects = trace_to_objects(trace([a, b]), REGION)[0]
    boxes = [[o[k] for k in ("x_min", "y_min", "x_max", "y_max")] for o in objects]
    scores = [o["score"] for o in objects]
    assert scores[0] > scores[1]

    def map50(scores):
        metrics = DetectionMetrics()
        metrics.add("c", boxes, scores, [gt], image_id=0)
        return metrics.coco_map()[1]

    assert map50(scores) == pytest.approx(1.0)
    assert map50(scores[::-1]) == pytest.approx(0.5, abs=0.01)  # the false positive first: precision 1/2 at recall 1


# ---- point() and detect() return the decoded bins --------------------------------------------------
class ScriptedLogits(nn.Module):
    """A region decoder whose argmax is forced: call k peaks at bins[k] (one list per output row)."""

    def __init__(self, bins: list[list[int]], n_bins: int):
        super().__init__()
        self.bins, self.n_bins, self.calls = bins, n_bins, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        peaks = self.bins[self.calls % len(self.bins)]
        self.calls += 1
        logits = torch.full((*hidden.shape[:-1], len(peaks), self.n_bins), -20.0)
        for row, b in enumerate(peaks):
            logits[..., row, b] = 20.0
        return logits.flatten(-2)


def forced_model(model, coord_bins: list[int], size_bins: list[int] | None = None):
    model.region.coord_decoder = ScriptedLogits([[b] for b in coord_bins], N)
    if size_bins is not None:
        model.region.size_decoder = ScriptedLogits([size_bins], N)
    with torch.no_grad():
        model.text.lm_head.bias[model.config.tokenizer.eos_id] = -1e4  # never stop; max_objects ends it
    return model


def test_point_x_and_y_are_the_decoded_bins(tiny_model_copy, test_image):
    model = forced_model(tiny_model_copy, [300, 700])
    (point,) = model.point(test_image, "dot", settings={"max_objects": 1})["points"]
    assert (point["x"], point["y"]) == (300 / 1024, 700 / 1024)


def test_detect_box_is_centre_bins_plus_minus_half_the_size_bins(tiny_model_copy, test_image):
    model = forced_model(tiny_model_copy, [256, 768], size_bins=[921, 0])
    (box,) = model.detect(test_image, "box", settings={"max_objects": 1})["objects"]
    w, h = size_of(921), 2.0**-10
    expected = [0.25 - w / 2, 0.75 - h / 2, 0.25 + w / 2, 0.75 + h / 2]
    assert [box[k] for k in ("x_min", "y_min", "x_max", "y_max")] == pytest.approx(expected, abs=1e-6)


# ---- hits on edges and IoU at the threshold --------------------------------------------------------
BOX = [0.2, 0.3, 0.6, 0.7]


@pytest.mark.parametrize("point", [(0.2, 0.5), (0.6, 0.5), (0.4, 0.3), (0.4, 0.7), (0.2, 0.3), (0.6, 0.7)],
                         ids=["left", "right", "top", "bottom", "top-left", "bottom-right"])
def test_point_on_an_edge_of_its_box_is_a_hit(point):
    assert match_points([point], [BOX]) == [(0, 0)]
    metrics = PointMetrics()
    metrics.add("c", [point], [BOX])
    assert metrics.summary()["f1"] == 1.0


@pytest.mark.parametrize("point", [(0.19, 0.5), (0.61, 0.5), (0.4, 0.29), (0.4, 0.71)])
def test_point_just_outside_an_edge_is_a_miss(point):
    assert match_points([point], [BOX]) == []


@pytest.mark.parametrize("shift", [(-1, 0), (1, 0), (0, -1), (0, 1)], ids=["left", "right", "top", "bottom"])
def test_boxes_sharing_only_an_edge_do_not_overlap(shift):
    gt = [1, 1, 2, 2]
    pred = [gt[0] + shift[0], gt[1] + shift[1], gt[2] + shift[0], gt[3] + shift[1]]
    assert box_iou([pred], [gt])[0, 0] == 0.0


def test_iou_of_exactly_one_half_from_integer_coordinates_is_a_match():
    # intersection 4 (2 x 2), union 8: IoU 0.5 exactly, on each side of the box
    gt = [0, 0, 4, 2]
    for pred in ([0, 0, 2, 2], [2, 0, 4, 2]):
        assert box_iou([pred], [gt])[0, 0] == 0.5
        assert match_boxes([pred], [gt], 0.5) == [(0, 0, 0.5)]
    metrics = DetectionMetrics(iou_threshold=0.5)
    metrics.add("c", [[0, 0, 2, 2]], [1.0], [gt], image_id=0)
    assert metrics.summary()["f1"] == 1.0
