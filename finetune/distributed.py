"""Running under `torchrun`: one process per device, PyTorch's own DistributedDataParallel.

Nothing here launches processes. `torchrun --nproc_per_node=N script.py ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; the first call to `process()` joins the group (nccl on CUDA, gloo otherwise). Without
those variables every function is a no-op for a single process, so the scripts have one code path.

How the trainers use it (see `finetune.training.Trainer`):
- each global batch (`--batch_size` per process x world size) is cut into one contiguous slice per
  rank, so each rank's batch still shares image encodings;
- gradients of the trainable parameters are averaged by DDP once per optimizer step (`no_sync` for
  the other micro-batches), then rescaled so the step's gradient is the mean over every unit (action,
  rollout) of the global window, exactly as one process with the whole batch would compute it;
- evaluation is sharded over ranks and gathered, so every rank holds the same metrics;
- rank 0 alone writes logs, checkpoints and pictures.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_process: Process | None = None


def process() -> Process:
    """This process's place in the run; joins the process group on first use under torchrun."""
    global _process
    if _process is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        _process = Process(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(_process.local_rank)
            # Evaluation and first-time downloads keep some ranks waiting on others: allow for long ones.
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return _process


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process drives its own GPU: cuda -> cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and process().distributed:
        return torch.device("cuda", process().local_rank)
    return device


def barrier() -> None:
    if process().distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block (a download, writing a generated dataset) before the others do."""
    if not process().is_main:
        barrier()
    yield
    if process().is_main:
        barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of `values` over all ranks (float64, one collective)."""
    if not process().distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable Python objects)."""
    if not process().distributed:
        return [obj]
    gathered: list[Any] = [None] * process().world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(items: list, batch_size: int) -> list:
    """This rank's contiguous slice of a global batch of `batch_size` x world size items."""
    rank = process().rank
    return items[rank * batch_size : (rank + 1) * batch_size]


class LossModule(nn.Module):
    """The model plus a trainer's loss function as one module, so DDP sees the forward it must sync.

    `forward(None)` is a zero loss touching every trainable parameter: a rank with nothing to learn
    from in a step (a short last batch, GRPO groups without reward spread) still joins the
    all-reduce with zero gradients.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        if batch is None:
            zero = sum(p.view(-1)[0] * 0.0 for p in self.model.parameters() if p.requires_grad)
            return zero, 0.0, {}
        return self.loss_fn(batch)


def wrap(model: nn.Module, loss_fn: Callable) -> nn.Module:
    """`LossModule`, inside DistributedDataParallel when there is more than one process.

    Only trainable parameters are synchronised. The frozen base stays out of DDP's start-up
    broadcast (every rank loaded the same weights), and so do the KV-cache buffers.
    `find_unused_parameters`: a batch need not use every trained part (pointing batches skip the
    size head).
    """
    module = LossModule(model, loss_fn)
    if not process().distributed:
        return module
    frozen = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
    buffers = [f"model.{n}" for n, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen + buffers)
    device = next(p for p in model.parameters() if p.requires_grad).device
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False, find_unused_parameters=True,
    )


def no_sync(module: nn.Module):
    """Skip DDP's all-reduce for this backward (gradients accumulate locally until a synced one)."""
    return module.no_sync() if isinstance(module, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
