"""Process groups for ``torchrun`` / ``accelerate launch``: every process takes its slice of each
step's prompts; ``sdft.runtime.parallel`` runs the model under DDP or FSDP2, which reduce the gradients.

Each process divides its summed loss by the divisor of the whole step (tokens or rollouts over all
processes), so the reduced gradient is exactly the gradient of the global loss. Process 0 alone
writes metrics, evaluations and checkpoints (under FSDP2 every process helps gather them). Sampling
is seeded per (step, process), so the processes draw different rollouts and a resumed run draws the
same ones again.

Backends: gloo on CPU (tested with ``torchrun --nproc_per_node 2``), nccl on CUDA (one GPU per
process, ``cuda:LOCAL_RANK``; not run here).
"""
from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from pathlib import Path

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


def launcher_processes(cmdline: list[str]) -> int | None:
    """The process count an ``accelerate launch`` command line asked for (None: not that launcher)."""
    if len(cmdline) < 2 or Path(cmdline[1]).name != "accelerate" or "launch" not in cmdline[2:3]:
        return None
    for i, word in enumerate(cmdline[3:], 3):
        if word.startswith("--num_processes="):
            return int(word.split("=", 1)[1])
        if word in ("--num_processes", "--num-processes") and i + 1 < len(cmdline):
            return int(cmdline[i + 1])
        if not word.startswith("-") and not cmdline[i - 1].startswith("--"):
            break  # the script: what follows are its own arguments
    return None


def _parent_cmdline() -> list[str]:
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_text().split("\0")
    except OSError:
        return []


def launched_size() -> int:
    """How many processes this run trains on: the process group's, or before it is joined, the number
    torchrun / accelerate put in the environment (``WORLD_SIZE``), as ``setup`` will join."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def check_launcher() -> None:
    """Refuse, in one line, a launcher that asked for N processes and started this one alone."""
    if launched_size() > 1:
        return
    try:
        asked = launcher_processes(_parent_cmdline())
    except ValueError:
        asked = None
    if asked is not None and asked > 1:
        raise ValueError(f"accelerate launch --num_processes {asked} started 1 process (without --multi_gpu, "
                         f"or on a CPU, accelerate runs a single one): use torchrun --nproc_per_node {asked} "
                         f"-m sdft.cli train ..., or accelerate launch --multi_gpu on GPUs")


def setup(device_name: str) -> World:
    """Join the process group torchrun / accelerate describe in the environment (or stay alone).

    ``accelerate launch --num_processes N`` that started one process (on a machine where it does not
    run N without ``--multi_gpu``, or without GPUs) is refused in one line: it would train alone on
    1/N of the batch."""
    size = launched_size()
    if size <= 1:
        check_launcher()
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:  # each process on its own GPU: NCCL's collectives, Triton and new CUDA tensors use the current one
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ValueError(f"process {rank} has LOCAL_RANK {local_rank}, but this machine has {count} CUDA "
                                 f"device{'' if count == 1 else 's'}: start at most {count} processes a machine "
                                 f"(torchrun --nproc_per_node {count}), or set device=cpu")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_destroy_group)
    return World(rank, size, local_rank)


def _destroy_group():
    """Destroy the group this module created while the interpreter is still whole: left to the
    interpreter's finalisation, gloo's worker threads can abort the process (SIGABRT, "terminate called
    without an active exception") after the work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int):
    """End a command-line process (or a test's torchrun worker) with ``code``. One that joined a process group
    (torchrun, accelerate)
    leaves without the interpreter's finalisation once its exit handlers have run (the group destroyed,
    the loggers closed) and its output is flushed: gloo's threads, left to finalisation, can abort a
    finished process (SIGABRT, "terminate called without an active exception"; seen once with sdft's
    torchrun test workers), which turns a run that wrote everything into a failed exit status."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    atexit._run_exitfuncs()
    if dist.is_initialized():  # a group another library made (accelerate's) and left to finalisation
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def all_reduce_sum(value: float, world: World) -> float:
    if not world.active:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)  # nccl reduces CUDA tensors only
    dist.all_reduce(t)
    return float(t.item())


def barrier(world: World):
    if world.active:
        dist.barrier()
