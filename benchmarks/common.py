"""What the benchmarks share: offline random-weight models of every preset, timing, peak memory,
FLOP estimates for MFU, and running one measurement in a process of its own."""

from __future__ import annotations

import gc
import importlib
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from finetune.base_model import init_random_weights, pick_device
from moondream2 import MoondreamConfig, MoondreamModel
from moondream2.config import builtin_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Peak dense (no sparsity) bfloat16 tensor-core TFLOP/s by CUDA device name. The first name contained
# in torch.cuda.get_device_name() wins, so the more specific names come first ("NVIDIA H100 80GB
# HBM3" is the SXM part).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

# Writing "5" here resets the process's peak resident set (VmHWM) to its current size (Linux >= 4.0).
CLEAR_REFS = Path("/proc/self/clear_refs")


def list_arg(value: Any, kind: type = str) -> list:
    """A comma-separated flag as a list: fire hands `--boxes=1,5` over as a tuple, `--boxes=1` as an int."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [kind(str(v).strip()) for v in items]


def build(preset: str, device: torch.device | str | None) -> MoondreamModel:
    """`preset` with deterministic random weights, never downloaded, in the dtype the trainers use
    (bfloat16 on CUDA, float32 elsewhere). The real sizes (md2) run offline too: the builtin tokenizer
    stands in for the hub's. The random-init presets get the same weights as `build_model` gives them.
    """
    config = MoondreamConfig.preset(preset)
    if config.tokenizer.source != "builtin":
        config.tokenizer = builtin_tokenizer(config.text.vocab_size)
    model = MoondreamModel(config)
    init_random_weights(model)
    target = pick_device(device)
    return model.to(device=target, dtype=torch.bfloat16 if target.type == "cuda" else torch.float32)


def param_counts(preset: str) -> dict:
    """Parameter counts of a preset, from a weightless (meta-device) build: instant at any size."""
    with torch.device("meta"):
        model = MoondreamModel(MoondreamConfig.preset(preset))
    return {
        "preset": preset,
        "params": dense_params(model),
        "text_blocks": dense_params(model.text.blocks),
        "vision": dense_params(model.vision),
        "region": dense_params(model.region),
    }


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer stops when the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_runs(fn: Callable[[], Any], warmup: int, runs: int, max_seconds: float,
               device: torch.device) -> tuple[list[float], Any]:
    """Seconds of up to `runs` calls of `fn` after `warmup` untimed ones, and the last call's result.

    Stops early once `max_seconds` of timed calls have run (always after at least one): a medium
    preset's minute-long GRPO step is timed once, a tiny one's several times, and the suite stays
    affordable on a CPU.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, result = [], None
    while not times or (len(times) < runs and sum(times) < max_seconds):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result


class PeakMemory:
    """Peak memory of the work after `start()`, in MiB above the level at `start()`.

    CUDA: allocated tensor memory. Elsewhere: the process's resident set, which counts everything it
    touches (activations, gradients, optimizer state, allocator slack) and whose peak only Linux can
    reset, so measure one configuration per process (`in_fresh_process`).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = 0.0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        elif CLEAR_REFS.exists():
            CLEAR_REFS.write_text("5")
            self.base = _proc_status_mib("VmRSS")
        else:
            self.base = _lifetime_peak_rss_mib()

    def extra_mib(self) -> float:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif CLEAR_REFS.exists():
            peak = _proc_status_mib("VmHWM")
        else:
            peak = _lifetime_peak_rss_mib()
        return peak - self.base


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise KeyError(field)


def _lifetime_peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def in_fresh_process(module: str, function: str, *args: Any) -> Any:
    """`module.function(*args)` in a process of its own, forked from a server that imported `module`
    once: its peak memory is its own, and it starts in milliseconds instead of importing torch again."""
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo (and sympy with it) is imported by the first optimizer step: seconds in every child
    # unless the server holds it.
    context.set_forkserver_preload([module, "torch._dynamo"])
    # The server (started by the first pool) imports from the environment's path, not from this
    # process's sys.path (Python 3.11), and whatever it fails to preload every child imports again.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), before]))
    try:
        pool = context.Pool(1)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    with pool:
        return pool.apply(_call, (module, function, *args))


def _call(module: str, function: str, *args: Any) -> Any:
    return getattr(importlib.import_module(module), function)(*args)


# ---- FLOPs, MFU and the device --------------------------------------------------------------------
def dense_params(module: torch.nn.Module) -> int:
    """Parameters of the base weights (LoRA adapters left out)."""
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" not in name)


def inference_flops(model: MoondreamModel, crops: int, text_tokens: int) -> float:
    """2 x parameters x tokens, per part: every crop's patches through the vision encoder, every text
    token (image prefix, prompt, decoded object slots) through the text blocks. Embeddings, heads and
    attention scores are left out."""
    vision_tokens = crops * model.config.vision.n_patches
    return 2.0 * (dense_params(model.vision) * vision_tokens + dense_params(model.text.blocks) * text_tokens)


def training_flops(model: MoondreamModel, tokens: int) -> float:
    """6 x parameters on the trained path x tokens: forward (2) and backward (4) of every decoder token
    through the text blocks, which every trainer's gradient flows back through (to the adapters, or
    from the region decoders to the region encoders that make the object slots)."""
    return 6.0 * dense_params(model.text.blocks) * tokens


def throughput(flops: float, seconds: float, peak_tflops: float | None) -> dict:
    """Achieved TFLOP/s, and MFU: that over the device's peak (None where no peak is known: CPUs,
    unlisted GPUs)."""
    achieved = flops / seconds / 1e12
    return {"tflops": achieved, "mfu": achieved / peak_tflops if peak_tflops else None}


def device_info(device: torch.device, peak_tflops: float | None = None) -> dict:
    """What the numbers were measured on; `peak_tflops` overrides the table (CUDA only). The load average
    tells whether other processes competed for the CPUs (OpenMP threads slow down many times over then)."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    peak = (peak_tflops or next((t for key, t in PEAK_BF16_TFLOPS if key in name), None)) if cuda else None
    return {
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16" if cuda else "float32",
        "peak_bf16_tflops": peak,
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
    }


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---- output ----------------------------------------------------------------------------------------
def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def ratio(value: float, base: float) -> float | None:
    """value / base, None when the base is not positive (a peak that did not rise above its start)."""
    return value / base if base > 0 else None


def ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def percent_text(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
