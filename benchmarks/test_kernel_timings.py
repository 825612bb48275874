"""The fused op's microbenchmarks under pytest-benchmark: sdft against naive PyTorch, TRL's loss helpers
and liger, per shape and objective, forward + backward (``bench_divergence``'s implementations).

Kept out of the default test run (``testpaths = tests``). Run, save and compare between commits:

    pytest benchmarks/ --benchmark-only --benchmark-autosave
    pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

``SDFT_BENCH_N`` (default 256 on CPU, 4096 on CUDA) sets the tokens per call; ``SDFT_BENCH_SHAPES``
(default ``smollm2``; e.g. ``smollm2,qwen``) the LM heads. Each group is one shape and objective, so
the saved table compares the implementations side by side.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.bench_divergence import IMPLS, SHAPES, available, fwd_bwd

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
N = int(os.environ.get("SDFT_BENCH_N", 4096 if DEVICE.type == "cuda" else 256))
BENCH_SHAPES = os.environ.get("SDFT_BENCH_SHAPES", "smollm2").split(",")
# objective -> (divergence, the implementations compared in its group)
OBJECTIVES = {
    "forward_kl": ("forward_kl", ["sdft", "naive", "trl", "liger"]),
    "reverse_kl": ("reverse_kl", ["sdft", "naive", "trl", "liger"]),
    "topk": ("reverse_kl", ["sdft_topk", "sdft_topk_triton", "trl_topk"]),
    "sampled_token": ("reverse_kl", ["sdft_sampled", "trl_sampled"]),
}
CASES = [(shape, objective, impl) for shape in BENCH_SHAPES for objective, (_, impls) in OBJECTIVES.items()
         for impl in impls]


@pytest.fixture(scope="module")
def inputs():
    made = {}

    def get(shape):
        if shape not in made:
            h, v = SHAPES[shape]
            gen = torch.Generator().manual_seed(0)
            hs = torch.randn(N, h, generator=gen).to(DEVICE, DTYPE).requires_grad_()
            ht = torch.randn(N, h, generator=gen).to(DEVICE, DTYPE)
            w = (torch.randn(v, h, generator=gen) / h**0.5).to(DEVICE, DTYPE).requires_grad_()
            made[shape] = (hs, ht, w)
        return made[shape]

    return get


@pytest.mark.parametrize("shape,objective,impl", CASES, ids=["-".join(c) for c in CASES])
def test_fused_divergence_timing(benchmark, inputs, shape, objective, impl):
    why = available(impl, DEVICE)
    if why:
        pytest.skip(why)
    divergence = OBJECTIVES[objective][0]
    step = fwd_bwd(IMPLS[impl], *inputs(shape), divergence)
    benchmark.group = f"{shape} {objective} N={N} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(shape=shape, objective=objective, n=N, device=str(DEVICE))

    def timed():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=3, warmup_rounds=1, iterations=1)  # values: tests/kernels/
