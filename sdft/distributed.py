"""Data parallelism for ``torchrun`` / ``accelerate launch``: every process takes its slice of each
step's prompts, and the gradients are summed across processes before the update.

No wrapper around the model is needed (the loss reads the decoder and the LM head directly, so
DDP's forward hooks would not see it): each process divides its summed loss by the divisor of the
whole step (tokens or rollouts over all processes), so one all-reduce (SUM) of the flattened
gradients gives exactly the gradient of the global loss. Every process then takes the same AdamW
step and keeps identical weights (and an identical EMA teacher). Process 0 alone writes
checkpoints, metrics, evaluations and the final model. Sampling is seeded per (step, process),
so the processes draw different rollouts and a resumed run draws the same ones again.

Backends: gloo on CPU (tested with ``torchrun --nproc_per_node 2``), nccl on CUDA (one GPU per
process, ``cuda:LOCAL_RANK``; not run here).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def setup(device_name: str) -> World:
    """Join the process group torchrun / accelerate describe in the environment (or stay alone)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local_rank)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def all_reduce_sum(value: float, world: World) -> float:
    if not world.active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def sum_gradients(params, world: World):
    """Sum every parameter's gradient across processes, in one flat buffer per dtype."""
    if not world.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def barrier(world: World):
    if world.active:
        dist.barrier()
