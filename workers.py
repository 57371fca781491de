"""Meta-batches across torchrun workers: each worker runs its own task; the meta-gradients are averaged before
one identical Adam step, and every re-drawn fc row is shared, so all workers hold the same weights."""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from model import ANML


def join(device: torch.device) -> torch.device:
    """Under torchrun, join the process group (gloo on CPU, nccl on CUDA) and return this worker's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # A worker that dies makes the others' next collective fail after this long instead of waiting forever.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
    if dist.get_rank() > 0:
        logging.getLogger().setLevel(logging.WARNING)
    return device


def leave(together: bool) -> None:
    """Leave the process group, if joined. `together`: wait for every worker first, as a worker that tears
    its group down while another still finishes its last save can abort (seen once under CI: SIGABRT, "terminate
    called without an active exception"); after an error the others may never arrive, so do not wait then."""
    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def share_lobotomies(model: ANML, cls: int) -> None:
    """Give every worker the fc row each worker re-drew for its own class (in rank order where classes repeat)."""
    if world_size() == 1:
        return
    weight = model.fc.weight
    classes = [torch.empty(1, dtype=torch.long, device=weight.device) for _ in range(world_size())]
    rows = [torch.empty_like(weight[0]) for _ in range(world_size())]
    dist.all_gather(classes, torch.tensor([cls], device=weight.device))
    dist.all_gather(rows, weight[cls].detach().clone())
    with torch.no_grad():
        for c, row in zip(classes, rows):
            weight[int(c)] = row


def average_gradients(optimizer: torch.optim.Optimizer, *_) -> None:
    """An optimizer step pre-hook: every worker's gradients replaced by their mean over the workers."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def gather(obj: object) -> list:
    """Every worker's `obj`, in rank order (a list of one without torchrun)."""
    if world_size() == 1:
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return objs


def mean_and_any(values: torch.Tensor, flag: bool) -> tuple[torch.Tensor, bool]:
    """The workers' mean of `values` and whether any worker raised `flag`; one small all-reduce."""
    if world_size() == 1:
        return values, flag
    stats = torch.cat([values.double(), torch.tensor([float(flag)], dtype=torch.float64, device=values.device)])
    dist.all_reduce(stats)
    return stats[:-1] / world_size(), bool(stats[-1] > 0)
