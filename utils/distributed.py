"""torchrun support: one code path for one process and for many.

Under ``torchrun --nproc_per_node N script.py ...`` the environment holds RANK, WORLD_SIZE and
LOCAL_RANK; :func:`setup` then joins the process group (NCCL on GPUs, gloo on CPU) and picks this
rank's GPU. A plain ``python script.py`` is the single-process case: every helper here is then a
no-op, so the scripts need no separate branch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .errors import USER_ERRORS


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group when launched by torchrun; returns the context and this rank's device."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(), device
    context = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return context, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a stop signal that reached one rank)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor(int(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module, ctx: Context, device: torch.device, find_unused_parameters: bool = False):
    """DistributedDataParallel under torchrun (gradients averaged over the processes), else the module."""
    if not ctx.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                     find_unused_parameters=find_unused_parameters)


def on_main_rank(work: Callable[[], Any], ctx: Context) -> Any:
    """``work()`` on rank 0 alone (checks, then writes), its result given to every rank.

    Bad input it raises (ConfigError, DataError, CheckpointError) is raised on every rank, so that
    all processes stop with the same message instead of waiting for rank 0 in a collective. A plain
    run (one process) just calls ``work``.
    """
    if not ctx.enabled:
        return work()
    outcome = None
    if ctx.is_main:
        try:
            outcome = ("done", work())
        except USER_ERRORS as error:
            outcome = ("error", error)
        except BaseException:
            broadcast_object(("failed", None))
            raise
    status, value = broadcast_object(outcome)
    if status == "error":
        raise value
    if status == "failed":
        raise RuntimeError("rank 0 failed (its traceback says why)")
    return value
