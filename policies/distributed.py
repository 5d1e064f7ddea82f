"""Process-group helpers for data-parallel training under ``torchrun`` (DistributedDataParallel).

``torchrun`` starts one process per device and gives each RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in its environment (https://pytorch.org/docs/stable/elastic/run.html). A process
started without them is a world of one: every helper below is then a no-op, so the training loop is one code path
with and without ``torchrun``.

The policy contract computes the objective in ``compute_loss``, but DDP arms its gradient all-reduce hooks in
``forward`` (``DistributedDataParallel.forward`` calls ``reducer.prepare_for_backward``); ``LossForward`` makes
``compute_loss`` the forward of the module that DDP wraps.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its CPU cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def training_device(device: str) -> torch.device:
    """``train.device`` for this process: ``cuda`` is ``cuda:LOCAL_RANK`` under torchrun (one GPU per process)."""
    if not launched_by_torchrun() or device == "cpu":
        return torch.device(device)
    if device != "cuda":
        raise ValueError(
            f"train.device={device} under torchrun: use train.device=cuda (each process takes cuda:LOCAL_RANK) "
            "or train.device=cpu"
        )
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def init_process_group(device: str, timeout_s: float) -> torch.device:
    """Join torchrun's process group, NCCL for ``train.device=cuda`` and gloo for ``cpu``, and return this process's
    training device. Without torchrun nothing is initialised and ``device`` is returned as it is.

    ``timeout_s`` bounds every wait of one rank for the others, including the ranks waiting while rank 0 alone
    evaluates in the simulator during training (torch's default is 10 min for NCCL, 30 min for gloo)."""
    target = training_device(device)
    if not launched_by_torchrun() or is_distributed():
        return target
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise ValueError(f"distributed launch without {missing} in the environment: start training with torchrun")
    if target.type == "cuda":
        torch.cuda.set_device(target)  # NCCL and the object collectives use the current device
    dist.init_process_group(
        backend="nccl" if target.type == "cuda" else "gloo", timeout=dt.timedelta(seconds=timeout_s)
    )
    return target


def destroy_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def run_on_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 alone, its result sent to every rank (a decision made once, e.g. a timestamped run
    directory); an exception raised by ``fn`` is re-raised on every rank so that all of them stop alike."""
    if world_size() == 1:
        return fn()
    box: list[Any] = [None, None]
    if rank() == 0:
        try:
            box[0] = fn()
        except Exception as err:  # sent to the other ranks, then re-raised here too
            box[1] = err
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the ranks (``x`` itself without a process group)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank: decisions from wall-clock time (``train.max_time_s``) must agree, or the
    ranks that stop would leave the others waiting in the next gradient all-reduce."""
    if world_size() == 1:
        return flag
    x = torch.tensor([flag], dtype=torch.uint8, device=device)
    dist.broadcast(x, src=0)
    return bool(x.item())


class LossForward(nn.Module):
    """``forward(batch) = policy.compute_loss(batch)``: the module that DDP wraps, so that the gradient hooks
    DDP prepares in its forward cover the objective. Holds the policy as a submodule: the same parameters."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: Mapping) -> tuple[torch.Tensor, dict]:
        return self.policy.compute_loss(batch)


def data_parallel(policy: nn.Module, device: torch.device) -> nn.Module:
    """``policy`` wrapped for gradient all-reduce: call the result with a batch to get ``(loss, logs)``.

    Construction broadcasts rank 0's parameters and buffers, so every rank starts from the same weights. DDP
    averages gradients over ranks; with equal per-rank batches that is the gradient of the global-batch mean loss.
    ``find_unused_parameters=True``: a policy may leave parameters out of one rank's graph (a conditional branch,
    an image encoder not used by every batch); without it that rank never all-reduces their bucket and the others
    wait for it. It costs one traversal of the autograd graph per step (DDP docs, "find_unused_parameters")."""
    return nn.parallel.DistributedDataParallel(
        LossForward(policy),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )
