"""Launchers for the Triton kernels: forward row statistics, backward via vocabulary chunks.

Backward: for each vocabulary chunk [v_lo, v_hi) the grad kernel writes d loss / d logits as a
bounded [N, chunk] block, then two GEMMs give dH (accumulated in fp32) and dW[v_lo:v_hi]
(one GEMM over all N rows, so dW is accumulated in fp32 inside the GEMM and written once).
"""
from __future__ import annotations

import functools

import math
import os

import torch

from . import triton_kernels as K
from .divergence_spec import DivergenceSpec

KIND_ID = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2, "sampled_token": 3}
# Bytes of the [N, chunk] gradient block of the backward.
GRAD_BLOCK_BYTES = 64 * 1024 * 1024


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffer for kernel outputs (tests poison it to prove every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Tile shapes on a GPU per kernel; benchmarks/tune_tiles.py measures alternatives.
# Chosen on an H100 (benchmarks/results/tune_tiles_h100_round*.log).
GPU_TILES = {
    "stats": dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3),
    "grad": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
}
# Small tiles keep the CPU interpreter quick and exercise the edge masks.
INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16)


def _tiles(device: torch.device, kernel: str):
    """(BLOCK_N, BLOCK_V, BLOCK_K, launch options) for one kernel on this device."""
    cfg = dict(GPU_TILES[kernel] if device.type == "cuda" else INTERPRETER_TILES)
    return cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V"), cfg.pop("BLOCK_K"), cfg


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied exactly (no tf32); 16-bit ones use the tensor cores."""
    if interpreting():
        return "interp"
    return "ieee" if dtype == torch.float32 else "tf32"


def _common(h_s, h_t, w, w_t):
    return (h_s.shape[1], h_t.shape[1], h_s.stride(0), h_t.stride(0), w.stride(0), w_t.stride(0))


def _splits(n_rows: int, vocab: int, block_n: int, block_v: int, device) -> tuple[int, int]:
    """Split the vocabulary so that the grid fills the device; returns (splits, columns per split)."""
    row_blocks = triton_cdiv(n_rows, block_n)
    v_tiles = triton_cdiv(vocab, block_v)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2
    splits = max(1, min(v_tiles, triton_cdiv(target, row_blocks)))
    per_split = triton_cdiv(v_tiles, splits) * block_v
    return triton_cdiv(vocab, per_split), per_split


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _combine(m, z, a):
    """Merge per-split online softmax partials: returns (lse, normalized sum)."""
    top = m.max(0).values
    scale = torch.exp(m - top)
    total = (z * scale).sum(0)
    return top + torch.log(total), (a * scale).sum(0) / total


def forward(h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool):
    """Per-row losses [N] (fp32) and statistics [3, N] = lse_s, lse_t, c."""
    n, vocab = h_s.shape[0], w.shape[0]
    bn, bv, bk, opts = _tiles(h_s.device, "stats")
    splits, per_split = _splits(n, vocab, bn, bv, h_s.device)
    grid = (triton_cdiv(n, bn), splits)
    common = _common(h_s, h_t, w, w_t)
    precision = _precision(h_s.dtype)
    part = alloc((6, splits, n), torch.float32, h_s.device)
    K.stats_kernel[grid](h_s, h_t, w, w_t, part, n, vocab, *common, spec.inv_temperature, per_split,
                         SHARED=shared, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PRECISION=precision, **opts)
    lse_s, mean_s_minus_t = _combine(part[0], part[1], part[2])
    lse_t, mean_t_minus_s = _combine(part[3], part[4], part[5])
    stats = torch.empty(3, n, dtype=torch.float32, device=h_s.device)
    stats[0], stats[1] = lse_s, lse_t
    if spec.kind == "reverse_kl":
        loss = mean_s_minus_t - lse_s + lse_t
        stats[2] = loss
    elif spec.kind == "forward_kl":
        loss = mean_t_minus_s - lse_t + lse_s
        stats[2] = 0.0
    else:
        jsd_part = alloc((2, splits, n), torch.float32, h_s.device)
        K.jsd_kernel[grid](h_s, h_t, w, w_t, stats, jsd_part, n, vocab, *common, spec.inv_temperature,
                           per_split, math.log(spec.beta), math.log1p(-spec.beta),
                           SHARED=shared, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PRECISION=precision, **opts)
        kl_qm, kl_pm = jsd_part.sum(1)
        loss = spec.beta * kl_qm + (1 - spec.beta) * kl_pm
        stats[2] = kl_pm
    return loss, stats


@functools.lru_cache(maxsize=None)
def _has_out_dtype_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(out_dtype=fp32)`` works for this device and input dtype (probed once)."""
    probe = torch.ones(1, 1, dtype=dtype, device=device_type)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


def _mm_fp32(a, b):
    """a @ b with an fp32 result, accumulated in fp32 where the platform allows it."""
    if a.dtype == torch.float32:
        return a @ b
    if _has_out_dtype_mm(a.device.type, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def backward(h_s, h_t, w, w_t, stats, row_grad, spec: DivergenceSpec, shared: bool,
             need_h: bool, need_w: bool, targets: torch.Tensor | None = None):
    """Gradients for student hidden and LM-head weight; ``row_grad`` (fp32 [N]) holds 1/T.
    ``targets`` (the sampled ids): the sampled-token estimator's gradient instead of the divergence's."""
    n, vocab = h_s.shape[0], w.shape[0]
    bn, bv, bk, opts = _tiles(h_s.device, "grad")
    common = _common(h_s, h_t, w, w_t)
    precision = _precision(h_s.dtype)
    elt = w.element_size()
    chunk = max(bv, (GRAD_BLOCK_BYTES // max(1, n * elt)) // bv * bv)
    chunk = min(chunk, triton_cdiv(vocab, bv) * bv)
    d_h = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device) if need_h else None
    d_w = alloc(w.shape, w.dtype, w.device) if need_w else None
    gz_buffer = alloc((n * chunk,), w.dtype, h_s.device)
    beta = spec.beta if spec.kind == "jsd" else 0.5
    row_grad = row_grad.contiguous()
    kind = KIND_ID["sampled_token" if targets is not None else spec.kind]
    ids = targets.contiguous() if targets is not None else row_grad  # a pointer KIND < 3 never reads
    for v_lo in range(0, vocab, chunk):
        v_hi = min(v_lo + chunk, vocab)
        width = v_hi - v_lo
        # A contiguous [n, width] block: CPU GEMMs may read a strided view's unwritten padding.
        block = gz_buffer[: n * width].view(n, width)
        grid = (triton_cdiv(n, bn), triton_cdiv(width, bv))
        K.grad_kernel[grid](h_s, h_t, w, w_t, stats, row_grad, ids, block, n, *common, width,
                            spec.inv_temperature, v_lo, v_hi, math.log(beta), math.log1p(-beta), 1 - beta,
                            KIND=kind, SHARED=shared, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
                            PRECISION=precision, **opts)
        if need_h:
            d_h += _mm_fp32(block, w[v_lo:v_hi])
        if need_w:
            torch.mm(block.T, h_s, out=d_w[v_lo:v_hi])
    return (d_h.to(h_s.dtype) if need_h else None), d_w


class SampledTokenKernels:
    """TRL's sampled-token estimator ``(log p(y) - log q(y)).detach() * log p(y)`` on the kernels above:
    the log-sum-exps from ``stats_kernel``, the sampled ids' logits from one dot per row, and the
    gradient ``c (onehot(y) - p)`` from ``grad_kernel``; the same interface as this module."""

    def __init__(self, targets: torch.Tensor):
        self.targets = targets

    def _target_logits(self, h, w, spec):
        rows = w.index_select(0, self.targets)
        return (h.float() * rows.float()).sum(-1) * spec.inv_temperature

    def forward(self, h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool):
        _, stats = forward(h_s, h_t, w, w_t, spec, shared)
        log_p = self._target_logits(h_s, w, spec) - stats[0]
        log_q = self._target_logits(h_t, w_t, spec) - stats[1]
        stats[2] = log_p - log_q
        return stats[2] * log_p, stats

    def backward(self, h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w):
        return backward(h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w, self.targets)
