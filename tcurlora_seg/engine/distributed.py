"""Data-parallel training under ``torchrun``: the process group, the per-rank device, rank-0-only work, reductions.

    torchrun --nproc_per_node=4 -m tcurlora_seg.train +experiment=brats data.root=PATH   # 4 GPUs (nccl)
    torchrun --nproc_per_node=2 -m tcurlora_seg.train trainer.device=cpu                 # 2 CPU processes (gloo)

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and the rendezvous address); so does submitit's
TorchDistributedEnvironment, which ``init`` calls in a SLURM job of several tasks launched through
``hydra/launcher=slurm`` (configs/hydra/launcher/slurm.yaml, ``tasks_per_node=N``). Without them the app runs as one
process and every function here is a no-op. Each process trains on its share of the cases (DistributedSampler) with
``data.batch_size`` crops, so the global batch is ``data.batch_size x WORLD_SIZE``; DistributedDataParallel averages
the gradients, which makes N processes with batch b take the same steps as one process with batch N*b. Only rank 0
writes (run folder, checkpoints, TensorBoard, progress bar); validation cases are split over the ranks and their
per-case metrics gathered on all of them, so that every rank takes the same decisions (best checkpoint, stop).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tcurlora_seg.errors import UserError

__all__ = ["Dist", "init", "barrier", "shutdown", "on_main", "broadcast", "all_gather", "mean", "wrap"]

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank among world_size processes (1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(name: str, local_rank: int) -> torch.device:
    """``trainer.device`` for one rank: auto / cuda become this rank's GPU (cuda:LOCAL_RANK)."""
    from tcurlora_seg.engine.run import resolve_device

    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
                        f"lower torchrun --nproc_per_node")
    return torch.device("cuda", local_rank)


def _from_slurm() -> None:
    """In a submitit SLURM job of several tasks, export the torch.distributed variables from SLURM's (MASTER_ADDR =
    the first node, RANK = SLURM_PROCID, ...). CUDA_VISIBLE_DEVICES is left alone: LOCAL_RANK picks the GPU."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun or as a multi-task SLURM job (nccl on GPUs, gloo on CPUs);
    else one process."""
    _from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        from tcurlora_seg.engine.run import resolve_device

        return Dist(), resolve_device(device_name)
    ctx = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = _device(device_name, ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def barrier(ctx: Dist) -> None:
    """Wait for every rank: called before the group is torn down, so that no rank exits while another still has
    collective work in flight (gloo then aborts with "terminate called without an active exception")."""
    if ctx.enabled:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(ctx: Dist, value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(ctx: Dist, task: Callable[[], T]) -> T:
    """Run ``task`` on rank 0 only and hand its result to every rank; its error is raised on every rank.

    The other ranks would otherwise wait forever at the next collective for a rank 0 that has stopped.
    """
    result: Any = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            result = task()
        except (UserError, SystemExit) as err:
            error = err
    result, error = broadcast(ctx, (result, error))
    if error is not None:
        raise error
    return result


def all_gather(ctx: Dist, value: T) -> list[T]:
    """Every rank's ``value``, in rank order (any picklable object)."""
    if not ctx.enabled:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def mean(ctx: Dist, value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (a copy; the input is left as it is)."""
    if not ctx.enabled:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / ctx.world_size


def wrap(ctx: Dist, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (already on ``device``) when distributed; else ``model`` itself.

    Buffers are not re-sent before every forward: the only ones are the adapters' fixed factors (C, R, indices),
    identical on every rank because they come from the same pretrained weights. (torch >= 2.13 names the switch
    ``forward_sync_buffers`` and deprecates ``broadcast_buffers``; both are accepted from torch 2.2 on.)
    """
    if not ctx.enabled:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=device_ids, **{no_sync: False})
