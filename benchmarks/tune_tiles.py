"""Time the Triton forward (statistics) and backward (gradient) passes under alternative tile shapes.

    python benchmarks/tune_tiles.py     # GPU only; prints one line per (shape, pass, config)
    python benchmarks/tune_tiles.py --shapes qwen --candidates 0 2 8 9   # the GPU suite's short form
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import median_ms  # noqa: E402
from sdft_kernels import make_spec, triton_backend  # noqa: E402

CANDIDATES = [
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=128, num_warps=4, num_stages=3),
    # Not yet timed: the shapes above spill 480-850 bytes a thread at 255 registers on sm_90 (bf16), these
    # less (stats) or none (grad): benchmarks/kernel_resources.py's compile, Triton 3.9
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3),
]
SHAPES = {"smollm2": (576, 49152), "qwen": (1536, 151936)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--candidates", nargs="+", type=int, default=list(range(len(CANDIDATES))),
                        help="indices into CANDIDATES")
    args = parser.parse_args()
    device = torch.device("cuda")
    spec = make_spec("reverse_kl")
    candidates = [CANDIDATES[i] for i in args.candidates]
    chains = (triton_backend.GPU_TILES, triton_backend.OTHER_GPU_TILES)  # whichever this GPU's tile_chain reads
    for name in args.shapes:
        h, v = SHAPES[name]
        n = 4096
        hs = torch.randn(n, h, device=device, dtype=torch.bfloat16)
        ht = torch.randn(n, h, device=device, dtype=torch.bfloat16)
        w = torch.randn(v, h, device=device, dtype=torch.bfloat16) / h**0.5
        _, stats = triton_backend.forward(hs, ht, w, w, spec, True)
        row_grad = torch.full((n,), 1.0 / n, device=device)
        tflop = 4 * n * h * v / 1e12
        for kernel in ("stats", "grad"):
            defaults = [chain[kernel] for chain in chains]
            for cfg in candidates:
                for chain in chains:
                    chain[kernel] = (cfg,)  # this shape alone
                triton_backend.FITTED.clear()
                if kernel == "stats":
                    fn = lambda: triton_backend.forward(hs, ht, w, w, spec, True)  # noqa: E731
                else:
                    fn = lambda: triton_backend.backward(hs, ht, w, w, stats, row_grad, spec, True, True, True)  # noqa: E731
                try:
                    ms = median_ms(fn, device, warmup=2, reps=10)
                except Exception as err:  # a config the compiler rejects (shared memory, registers)
                    print(f"{name} {kernel} {cfg} failed: {type(err).__name__}", flush=True)
                    continue
                work = tflop * (1 if kernel == "stats" else 2)
                print(f"{name} {kernel} {cfg} {ms:.2f} ms {work / (ms * 1e-3):.0f} TFLOP/s", flush=True)
            for chain, default in zip(chains, defaults):
                chain[kernel] = default
    # The backward's cuBLAS share alone, for reference.
    h, v = SHAPES["qwen"]
    gz = torch.randn(4096, 8192, device=device, dtype=torch.bfloat16)
    wc = torch.randn(8192, h, device=device, dtype=torch.bfloat16)
    hs = torch.randn(4096, h, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: (torch.mm(gz, wc, out_dtype=torch.float32), gz.T @ hs), device, reps=20)
    print(f"qwen cublas per 8192-column chunk: {ms:.3f} ms, x{v / 8192:.1f} chunks = {ms * v / 8192:.2f} ms")


if __name__ == "__main__":
    main()
