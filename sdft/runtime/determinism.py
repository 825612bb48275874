"""``full_determinism``: the deterministic-algorithm switches transformers' ``enable_full_determinism``
sets, for the duration of a run and then restored (the process may go on to other work).

What a seed already fixes without it (tested in tests/run/test_seed_reproducibility.py): the data order,
the rollouts (sampled from a per-(step, process) generator), decoding's GEMM layout (``decode_gemm=rule``
is a function of the row count, never of timing), the loss's chunk sizes (functions of the shapes) and
the Triton tile table (a function of the device). What it does not fix: results across machines with
other CPUs, thread counts (``OMP_NUM_THREADS``) or library builds, whose kernels sum in other orders.
"""
from __future__ import annotations

import os

import torch

# What transformers' enable_full_determinism sets too: cuBLAS's deterministic workspace, and flash-attn's
# deterministic backward (attn_implementation=flash_attention_2 reads it; its default backward sums with atomics).
ENVIRONMENT = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "FLASH_ATTENTION_DETERMINISTIC": "1"}


def deterministic_algorithms(on: bool):
    """Switch deterministic algorithms on (when ``on``); returns a function that restores the old state."""
    if not on:
        return lambda: None
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, {name: os.environ.get(name) for name in ENVIRONMENT})
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def restore():
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
        for name, value in before[3].items():
            if value is None:
                os.environ.pop(name, None)

    return restore
