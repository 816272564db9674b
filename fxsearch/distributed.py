"""Several processes with torch.distributed: the pieces the search driver uses.

Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1 in the environment) ``init_from_env``
joins the process group (gloo on the CPU, nccl on CUDA, one GPU per process by LOCAL_RANK).
Training goes through DistributedDataParallel (``wrap``); the search model is wrapped with its
cost (``SearchStep``), so that every use of the choice parameters happens inside the wrapped
forward. Training data is sharded by DistributedSampler, evaluation data by a strided subset
whose sums are all-reduced (``all_sum``): the accuracy is that of the whole split. Without a
process group (or with one process) these functions change nothing, so one code path serves
both.

AMP: ``autocast`` (bf16 on CPU and CUDA, fp16 on CUDA) and ``grad_scaler`` (fp16 only). The
quantizers compute in float32 whatever the autocast state (fxsearch/quantizers.py), and the
cost is computed outside autocast.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

from .errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---- the process group ---------------------------------------------------------------------
def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def init_from_env(device: str | torch.device = "auto") -> torch.device:
    """Join the process group that torchrun's environment describes, if WORLD_SIZE > 1, and
    return this process's device: ``device`` as resolve_device reads it, with CUDA made
    cuda:LOCAL_RANK. Backend: nccl on CUDA, gloo on the CPU."""
    from .search import resolve_device
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dev
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # the other ranks wait at a barrier while rank 0 exports and checks ONNX: allow an hour
        timeout = datetime.timedelta(minutes=60)
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return dev


def shutdown(wait: bool = True) -> None:
    """Leave the process group; ``wait``: after a last barrier, so that no rank leaves while
    rank 0 still writes (not after an error: the other ranks may be inside another collective)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the processes (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (pickled; for small objects such as an example batch)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


# ---- data ------------------------------------------------------------------------------------
def train_sampler(dataset: Dataset, seed: int = 0) -> DistributedSampler | None:
    """A shuffling DistributedSampler when several processes run, else None. With the
    per-process batch = global batch / N, global batch k holds the same samples for every N."""
    return DistributedSampler(dataset, shuffle=True, seed=seed) if active() else None


def shard(dataset: Dataset) -> Dataset:
    """This process's share of an evaluation split (every N-th sample, nothing repeated)."""
    return Subset(dataset, range(rank(), len(dataset), world_size())) if active() else dataset


def advance_epoch(loader: Any) -> None:
    """After a pass over ``loader``: the next epoch of its DistributedSampler (a new shuffle)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(sampler.epoch + 1)


# ---- models ----------------------------------------------------------------------------------
class SearchStep(nn.Module):
    """(search_model(x), search_model.cost) in one forward. DistributedDataParallel then sees
    every use of the choice parameters in the forward it wraps; the cost is computed in
    float32, outside autocast (it is identical on every process: the parameters are)."""

    def __init__(self, search_model: nn.Module):
        super().__init__()
        self.search_model = search_model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.search_model(x)
        with torch.autocast(x.device.type, enabled=False):
            cost = self.search_model.cost
        return out, cost


def wrap(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``module`` when several processes run (rank 0's
    parameters and buffers are broadcast now, buffers again at every forward), else ``module``.
    Every choice parameter of a search model gets a gradient (zero where a choice is idle, also
    with hard and Gumbel sampling), so find_unused_parameters is only for other models whose
    forward leaves parameters unused."""
    if not active():
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def sync_batchnorm(model: nn.Module, device: torch.device, enabled: bool = True) -> Callable[[], None]:
    """Replace the model's BatchNorm layers by SyncBatchNorm (statistics over the global
    batch) sharing their parameters and buffers; returns the function that puts the original
    modules back, so finalize and checkpoints see the model's own classes. Only where
    SyncBatchNorm can run: several processes on CUDA (PyTorch's SyncBatchNorm has no CPU
    implementation); elsewhere nothing changes."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if enabled and active() and device.type == "cuda":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                    swapped.append((parent, name, child))

    def restore() -> None:
        for parent, name, child in swapped:
            setattr(parent, name, child)
    return restore


# ---- mixed precision ---------------------------------------------------------------------------
def check_amp(amp: str | None, device: torch.device) -> None:
    if amp is None:
        return
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp={amp!r}; choose bf16, fp16 or None")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs CUDA (its gradients are scaled by a CUDA GradScaler); use bf16 on the CPU")


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """torch.autocast in ``amp``'s dtype on ``device``'s type, or nothing when amp is None."""
    if amp is None:
        return contextlib.nullcontext()
    check_amp(amp, device)
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its gradients underflow without one); None otherwise."""
    check_amp(amp, device)
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None
