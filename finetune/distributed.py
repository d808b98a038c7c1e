"""Running under `torchrun`: one process per device, PyTorch's own DistributedDataParallel or FSDP.

Nothing here launches processes. `torchrun --nproc_per_node=N script.py ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; the first call to `process()` joins the group (nccl on CUDA, gloo otherwise). Without
those variables every function is a no-op for a single process, so the scripts have one code path.

How the trainers use it (see `finetune.trainer.Trainer`):
- each global batch (`--batch_size` per process x world size) is cut into one contiguous slice per
  rank, so each rank's batch still shares image encodings;
- gradients of the trainable parameters are averaged over ranks (DDP: once per optimizer step,
  `no_sync` for the other micro-batches), then rescaled so the step's gradient is the mean over
  every unit (action, rollout) of the global window, as one process with the whole batch computes it;
- evaluation is sharded over ranks and gathered, so every rank holds the same metrics;
- rank 0 alone writes logs, checkpoints and pictures.

Two engines (`wrap`):
- DDP (default): every rank holds the whole model; only the trainable parameters are synchronised.
- FSDP (`--fsdp=True`, PyTorch's `fully_shard`): parameters, gradients and optimizer state are
  split across ranks, each text block but the first its own unit (all-gathered for its forward and
  backward) and everything else one root unit. Collectives run per unit per forward, so every rank
  must run the same number of forward passes per optimizer step: an empty micro-batch still runs
  the decoder once (`LossModule`), and callers pass one entry per micro-batch of the window.
"""

from __future__ import annotations

import atexit
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
            # Left to the interpreter's teardown, gloo's threads now and then abort the process at exit
            # ("terminate called without an active exception"), failing a finished run.
            atexit.register(dist.destroy_process_group)
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
    """The model plus a trainer's loss function as one module, so DDP / FSDP see the forward they sync.

    `forward(None)` is a zero loss: a rank with nothing to learn from in a step (a short last batch,
    GRPO groups without reward spread) runs the decoder on one token and touches every trained
    parameter outside the text blocks, so it joins the step's collectives with zero gradients.
    `touch_all`: add that zero to every loss, so each trained parameter has a gradient on every rank
    (FSDP reduces a unit's gradients together and needs the same set everywhere); without it, only to
    a loss that nothing trained reaches.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, touch_all: bool = False):
        super().__init__()
        self.model, self.loss_fn, self.touch_all = model, loss_fn, touch_all

    def forward(self, batch):
        if batch is None:
            model = self.model
            token = torch.tensor([[model.config.tokenizer.bos_id]], device=model.device)
            return model.hidden_states(model.text.embed(token)).sum() * 0.0 + self._touch(), 0.0, {}
        loss, weight, logs = self.loss_fn(batch)
        # Nothing trained may reach a loss: a batch of negatives while only the region head trains
        # (its stop decisions come from the frozen decoder). Its gradient is zero, and backward must
        # still run, here and on every other process.
        return (loss + self._touch() if self.touch_all or not loss.requires_grad else loss), weight, logs

    def _touch(self) -> torch.Tensor:
        """Zero, with a gradient path to every trained parameter outside the text blocks (the blocks'
        own are reached by any decoder pass)."""
        trained = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("text.blocks.")]
        return sum((p.reshape(-1)[0] * 0.0 for p in trained), torch.zeros((), device=self.model.device))


def wrap(model: nn.Module, loss_fn: Callable, shard: bool = False) -> nn.Module:
    """`LossModule`, inside DistributedDataParallel (or sharded by FSDP with `shard`) when there is
    more than one process.

    DDP synchronises only trainable parameters: the frozen base stays out of its start-up broadcast
    (every rank loaded the same weights), and so do the KV-cache buffers. `find_unused_parameters`:
    a batch need not use every trained part (pointing batches skip the size head).
    """
    if not process().distributed:
        return LossModule(model, loss_fn)
    if shard:
        return _fully_shard(LossModule(model, loss_fn, touch_all=True), model)
    module = LossModule(model, loss_fn)
    frozen = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
    buffers = [f"model.{n}" for n, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen + buffers)
    device = next(p for p in model.parameters() if p.requires_grad).device
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False, find_unused_parameters=True,
    )


def _fully_shard(module: LossModule, model: nn.Module) -> nn.Module:
    """Text blocks 1..N-1 one FSDP unit each; the root unit holds the rest (vision, embeddings, heads)
    and block 0.

    A unit reduces its gradients when the gradient of its input arrives, or, when its input needs
    none, at the end of backward together with the root. Block 0's input needs a gradient only when
    the batch has object embeddings from a trained region head (a batch of negatives has none), so as
    a unit of its own it would reduce at different moments on different ranks; the later blocks'
    inputs always need one. On CUDA the units are gathered in bfloat16 and gradients reduced in
    float32; the float32 shards are what AdamW steps, as in the unsharded trainers.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    on_cuda = model.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_cuda else None,
                                  reduce_dtype=torch.float32 if on_cuda else None)
    for block in model.text.blocks[1:]:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    with torch.no_grad():
        module(None)  # FSDP sets itself up on the root's first forward; evaluation may come before any
    module.reshard()  # the root stays gathered after a forward; the optimizer must see the shards
    return module


def no_sync(module: nn.Module):
    """Skip DDP's all-reduce for this backward (gradients accumulate locally until a synced one).

    FSDP reduce-scatters after every micro-batch instead: skipping it would keep whole unsharded
    gradients on every GPU, the memory FSDP is there to save. The sum is the same.
    """
    return module.no_sync() if isinstance(module, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


def _is_fsdp(module: nn.Module) -> bool:
    """Sharded by FSDP (possible only under torchrun: FSDP is not even imported otherwise, 0.7 s)."""
    if not process().distributed:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _is_shard(tensor: torch.Tensor) -> bool:
    if not process().distributed:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Inside, a sharded model's parameters are whole on every rank, for inference (evaluation)
    that calls the model's methods directly. Costs one bf16 copy of the model per GPU; no-op
    without FSDP."""
    if not _is_fsdp(module):
        yield
        return
    units = [m for m in module.modules() if _is_fsdp(m)]
    module.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        module.set_reshard_after_forward(True)
        module.set_reshard_after_forward(False, recurse=False)  # the root's default: backward follows forward


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP shard (a collective: every rank must call it), else the tensor itself."""
    return tensor.full_tensor() if _is_shard(tensor) else tensor


def copy_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter in place; a sharded one keeps only its own shard."""
    with torch.no_grad():
        if _is_shard(param):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None)  # every rank holds the same value: slice locally
        param.copy_(value)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name and whole, so a run resumes on any number of
    processes (under torchrun a collective; the whole state lands on rank 0's CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # 0.7 s to import

    spread = process().distributed
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=spread, cpu_offload=spread))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state`; every rank passes the same whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=process().distributed))
