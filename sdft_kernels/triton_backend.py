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
from .divergence import KERNEL_KIND, DivergenceSpec
from .heads import soft_cap

# The kernels' KIND: the divergences' ids (sdft_kernels.divergence), then the two non-divergence gradients.
KIND_ID = {**KERNEL_KIND, "sampled_token": 3, "softmax": 4}
# Bytes of the [N, chunk] gradient block of the backward.
GRAD_BLOCK_BYTES = 64 * 1024 * 1024


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffer for kernel outputs (tests poison it to prove every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Tile shapes on a GPU per kernel, in order of preference (``tile_chain``). A GPU that cannot hold a shape
# for the inputs at hand takes the next (``fitted``): fp32 operands take twice bf16's shared memory per
# pipeline stage, which an A100 (163 KiB a block), a consumer or L4-class card (99 KiB) or a T4 (64 KiB)
# may not have; the later shapes buffer fewer stages, then take smaller tiles.
# Hopper (compute capability 9): the first of each was the fastest on an H100
# (benchmarks/results/tune_tiles_h100_round*.log, bf16).
GPU_TILES = {
    "stats": (dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3),
              dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=2),
              dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=4, num_stages=2),
              dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=1)),
    "grad": (dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
             dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
             dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2),
             dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=4, num_stages=2),
             dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=1)),
    # Not yet measured on a GPU: small row blocks keep the [BLOCK_N, 2K] int64 merge in registers.
    "topk": (dict(BLOCK_N=16, BLOCK_V=0, BLOCK_K=64, num_warps=4, num_stages=2),
             dict(BLOCK_N=16, BLOCK_V=0, BLOCK_K=32, num_warps=4, num_stages=1)),
}
# Every other GPU (Ampere, Ada, Blackwell): not timed (the GPUs lent here are Hoppers), chosen by the
# compiled kernels' spills. Compiled for those architectures, the H100's shapes spill 270 to 1,200 bytes a
# thread at 255 registers (an A100's grad kernel with a shared head: 32 registers and 5.3 KB of stack),
# 64 x 128 x 64 with 8 warps none to about 380 (benchmarks/results/kernel_resources_triton39.md).
_SMALLER = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, num_warps=8)
OTHER_GPU_TILES = {
    "stats": (dict(_SMALLER, num_stages=3), dict(_SMALLER, num_stages=2), *GPU_TILES["stats"][2:]),
    "grad": (dict(_SMALLER, num_stages=3), dict(_SMALLER, num_stages=2), *GPU_TILES["grad"][3:]),
    "topk": GPU_TILES["topk"],
}
# Small tiles keep the CPU interpreter quick and exercise the edge masks.
INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16)
# (kernel, GPU capability, variant) -> index of the first tile shape that launched there
FITTED: dict[tuple, int] = {}


def _split(shape: dict):
    """(BLOCK_N, BLOCK_V, BLOCK_K, launch options) of one tile shape."""
    cfg = dict(shape)
    return cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V"), cfg.pop("BLOCK_K"), cfg


def first_fitting(shapes, run, start: int = 0):
    """(index, ``run(*tiles)``) for the first of ``shapes`` from ``start`` that this GPU can launch.

    Triton raises ``OutOfResources`` before a kernel does any work when a shape needs more shared memory
    (or registers, as threads) than the device has; ``run`` allocates its own outputs, so a retry starts
    clean."""
    from triton.runtime.errors import OutOfResources

    refused = None
    for index in range(start, len(shapes)):
        try:
            return index, run(*_split(shapes[index]))
        except OutOfResources as err:
            refused = err
    raise RuntimeError(f"no tile shape of sdft's Triton kernels fits this GPU ({refused}); "
                       "use backend='torch'") from refused


def tile_chain(kernel: str, capability: tuple[int, int], hip: bool = False) -> tuple[dict, ...]:
    """``kernel``'s tile shapes in order of preference on a GPU of compute ``capability`` (``hip``: an AMD
    GPU under ROCm, whose MI300 also reports 9.x)."""
    return (GPU_TILES if capability[0] == 9 and not hip else OTHER_GPU_TILES)[kernel]


def fitted(kernel: str, device: torch.device, variant: tuple, run):
    """``run(BLOCK_N, BLOCK_V, BLOCK_K, launch options)`` under ``kernel``'s tile shapes for ``device``: the
    interpreter's on CPU; on a GPU the first of ``tile_chain`` it can launch for this ``variant`` (dtype and
    the constants that change the kernel's resources), remembered per GPU model."""
    if device.type != "cuda":
        return run(*_split(INTERPRETER_TILES))
    capability = torch.cuda.get_device_capability(device)
    key = (kernel, capability, variant)
    chain = tile_chain(kernel, capability, hip=torch.version.hip is not None)
    index, result = first_fitting(chain, run, FITTED.get(key, 0))
    FITTED[key] = index
    return result


def _precision(dtype: torch.dtype) -> str:
    """The kernels' products: 16-bit operands on the tensor cores; fp32 ones exactly, or in TF32 where this
    process allows TF32 for fp32 matrix products (a run's ``tf32=true``, torch's ``allow_tf32`` or
    ``set_float32_matmul_precision("high")``), as cuBLAS then computes the rest of the model."""
    if interpreting():
        return "interp"
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


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


def _cap_args(cap: float | None) -> tuple[float, bool]:
    """(cap, CAP) kernel arguments for an optional soft cap."""
    return (1.0, False) if cap is None else (float(cap), True)


def _partials(name: str, planes: int, h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool, cap: float | None,
              before: tuple = (), after: tuple = ()):
    """``{name}_kernel``'s per-split partials ``[planes, splits, N]`` (fp32): the vocabulary split so that the
    grid fills the device; ``before`` / ``after``: the kernel's arguments around its output and sizes."""
    kernel = getattr(K, f"{name}_kernel")
    n, vocab = h_s.shape[0], w.shape[0]
    cap, capped = _cap_args(cap)
    precision = _precision(h_s.dtype)

    def run(bn, bv, bk, opts):
        splits, per_split = _splits(n, vocab, bn, bv, h_s.device)
        part = alloc((planes, splits, n), torch.float32, h_s.device)
        kernel[(triton_cdiv(n, bn), splits)](
            h_s, h_t, w, w_t, *before, part, n, vocab, *_common(h_s, h_t, w, w_t), spec.inv_temperature, cap,
            per_split, *after, SHARED=shared, CAP=capped, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
            PRECISION=precision, **opts)
        return part

    return fitted("stats", h_s.device, (name, h_s.dtype, precision, shared, capped), run)


def row_statistics(h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool, cap: float | None = None):
    """``stats_kernel``: per row (lse_s, mean_p(s - t), lse_t, mean_q(t - s)), fp32 [N] each."""
    part = _partials("stats", 6, h_s, h_t, w, w_t, spec, shared, cap)
    return (*_combine(part[0], part[1], part[2]), *_combine(part[3], part[4], part[5]))


def forward(h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool, cap: float | None = None):
    """Per-row losses [N] (fp32) and statistics [3, N] = lse_s, lse_t, c; ``cap``: soft-capped logits."""
    n = h_s.shape[0]
    lse_s, mean_s_minus_t, lse_t, mean_t_minus_s = row_statistics(h_s, h_t, w, w_t, spec, shared, cap)
    stats = torch.empty(3, n, dtype=torch.float32, device=h_s.device)
    stats[0], stats[1] = lse_s, lse_t
    if spec.kind == "reverse_kl":
        loss = mean_s_minus_t - lse_s + lse_t
        stats[2] = loss
    elif spec.kind == "forward_kl":
        loss = mean_t_minus_s - lse_t + lse_s
        stats[2] = 0.0
    else:
        kl_qm, kl_pm = _partials("jsd", 2, h_s, h_t, w, w_t, spec, shared, cap, before=(stats,),
                                 after=(math.log(spec.beta), math.log1p(-spec.beta))).sum(1)
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
             need_h: bool, need_w: bool, targets: torch.Tensor | None = None, cap: float | None = None,
             kind: str | None = None):
    """Gradients for student hidden and LM-head weight; ``row_grad`` (fp32 [N]) holds 1/T.
    ``targets`` (the sampled ids): the sampled-token estimator's gradient instead of the divergence's;
    ``kind="softmax"``: the gradient of the student's log-sum-exp; ``cap``: soft-capped logits."""
    n, vocab = h_s.shape[0], w.shape[0]
    common = _common(h_s, h_t, w, w_t)
    precision = _precision(h_s.dtype)
    beta = spec.beta if spec.kind == "jsd" else 0.5
    row_grad = row_grad.contiguous()
    kind = KIND_ID[kind or ("sampled_token" if targets is not None else spec.kind)]
    ids = targets.contiguous() if targets is not None else row_grad  # a pointer KIND != 3 never reads
    cap, capped = _cap_args(cap)

    def run(bn, bv, bk, opts):
        chunk = max(bv, (GRAD_BLOCK_BYTES // max(1, n * w.element_size())) // bv * bv)
        chunk = min(chunk, triton_cdiv(vocab, bv) * bv)
        d_h = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device) if need_h else None
        d_w = alloc(w.shape, w.dtype, w.device) if need_w else None
        gz_buffer = alloc((n * chunk,), w.dtype, h_s.device)
        for v_lo in range(0, vocab, chunk):
            v_hi = min(v_lo + chunk, vocab)
            width = v_hi - v_lo
            # A contiguous [n, width] block: CPU GEMMs may read a strided view's unwritten padding.
            block = gz_buffer[: n * width].view(n, width)
            grid = (triton_cdiv(n, bn), triton_cdiv(width, bv))
            K.grad_kernel[grid](h_s, h_t, w, w_t, stats, row_grad, ids, block, n, *common, width,
                                spec.inv_temperature, cap, v_lo, v_hi, math.log(beta), math.log1p(-beta), 1 - beta,
                                KIND=kind, SHARED=shared, CAP=capped, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
                                PRECISION=precision, **opts)
            if need_h:
                d_h += _mm_fp32(block, w[v_lo:v_hi])
            if need_w:
                torch.mm(block.T, h_s, out=d_w[v_lo:v_hi])
        return d_h, d_w

    d_h, d_w = fitted("grad", h_s.device, (h_s.dtype, precision, kind, shared, capped), run)
    return (d_h.to(h_s.dtype) if need_h else None), d_w


class FullKernels:
    """The full-vocabulary divergence on the kernels above with a soft cap (``cap``; None: none)."""

    def __init__(self, cap: float | None = None):
        self.cap = cap

    def forward(self, h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool):
        return forward(h_s, h_t, w, w_t, spec, shared, self.cap)

    def backward(self, h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w):
        return backward(h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w, cap=self.cap)


def _cap_slope(logits: torch.Tensor, cap: float | None, inv_temp: float) -> torch.Tensor | float:
    """d(capped logit) / d(raw logit) = 1 - tanh^2, read back from temperature-scaled capped logits."""
    if cap is None:
        return 1.0
    return 1.0 - (logits / (cap * inv_temp)).square()


class SampledTokenKernels:
    """TRL's sampled-token estimator ``(log p(y) - log q(y)).detach() * log p(y)`` on the kernels above:
    the log-sum-exps from ``stats_kernel``, the sampled ids' logits from one dot per row, and the
    gradient ``c (onehot(y) - p)`` from ``grad_kernel``; the same interface as this module."""

    def __init__(self, targets: torch.Tensor, cap: float | None = None):
        self.targets, self.cap = targets, cap

    def _target_logits(self, h, w, spec):
        rows = w.index_select(0, self.targets)
        return soft_cap((h.float() * rows.float()).sum(-1), self.cap) * spec.inv_temperature

    def forward(self, h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool):
        _, stats = forward(h_s, h_t, w, w_t, spec, shared, self.cap)
        log_p = self._target_logits(h_s, w, spec) - stats[0]
        log_q = self._target_logits(h_t, w_t, spec) - stats[1]
        stats[2] = log_p - log_q
        return stats[2] * log_p, stats

    def backward(self, h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w):
        return backward(h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w, self.targets, self.cap)


# Bytes of the gathered [rows, k, H] head rows when reading logits at the top-k ids.
GATHER_BYTES = 64 * 1024 * 1024
MAX_TOPK = 256


def _row_slices(n: int, per_row_bytes: int):
    step = max(1, GATHER_BYTES // max(per_row_bytes, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def topk_ids(x, w, k: int, spec: DivergenceSpec, cap: float | None):
    """(ids [N, k], logits [N, k]) of the k largest (capped, / T) logits of ``x @ w.T`` per row, ties to
    the lower id: ``topk_kernel`` keeps a running top-K per vocabulary split, torch merges the splits."""
    n, vocab = x.shape[0], w.shape[0]
    width = max(16, 1 << (k - 1).bit_length())  # K: a power of two, at least a tl.dot tile
    cap, capped = _cap_args(cap)
    precision = _precision(x.dtype)

    def run(bn, _, bk, opts):
        splits, per_split = _splits(n, vocab, bn, width, x.device)
        keys = alloc((splits, n, width), torch.int64, x.device)
        K.topk_kernel[(triton_cdiv(n, bn), splits)](
            x, w, keys, n, vocab, x.shape[1], x.stride(0), w.stride(0), spec.inv_temperature, cap, per_split,
            CAP=capped, K=width, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, **opts)
        return keys.permute(1, 0, 2).reshape(n, splits * width)

    keys = fitted("topk", x.device, (x.dtype, precision, width, capped), run).topk(k, dim=1).values
    ordered = (keys >> 32).to(torch.int32)
    values = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return 0x7FFFFFFF - (keys & 0xFFFFFFFF), values


def logits_at(x, w, ids, spec: DivergenceSpec, cap: float | None) -> torch.Tensor:
    """fp32 (capped, / T) logits of ``x @ w.T`` at ``ids`` [N, k], gathering head rows a row block at a time."""
    out = torch.empty(ids.shape, dtype=torch.float32, device=x.device)
    for rows in _row_slices(x.shape[0], ids.shape[1] * x.shape[1] * 4):
        picked = w.index_select(0, ids[rows].reshape(-1)).view(-1, ids.shape[1], w.shape[1]).float()
        out[rows] = torch.bmm(picked, x[rows].float()[:, :, None]).squeeze(-1)
    return soft_cap(out, cap) * spec.inv_temperature


class TopKKernels:
    """The top-k objective (``objectives.TopK``) without [N, V]: the stats kernel gives both full
    log-sum-exps, ``topk_kernel`` the support (ids and, exactly, the support side's logits), a gather
    the other side's logits there; the objective's formula on those [N, k] values gives the loss and,
    by autograd on them, d loss / d support logits (scattered onto k ids: sparse dH and dW) and
    d loss / d lse_s (the tail bucket only: times the softmax, ``grad_kernel`` KIND 4)."""

    def __init__(self, objective, cap: float | None = None):
        if objective.k > MAX_TOPK:
            raise ValueError(f"backend='triton' computes top-k for k <= {MAX_TOPK}, got topk={objective.k}; "
                             "use backend='auto' or 'torch'")
        self.objective, self.cap = objective, cap

    def forward(self, h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool):
        stats = None  # renormalised over the support, the loss reads no log-sum-exp: no full-vocabulary pass
        if self.objective.add_tail:
            lse_s, _, lse_t, _ = row_statistics(h_s, h_t, w, w_t, spec, shared, self.cap)
            stats = torch.stack([lse_s, lse_t, torch.zeros_like(lse_s)])  # grad_kernel's [3, N] (c unused)
        k = min(self.objective.k, w.shape[0])
        if self.objective.support == "student":
            ids, s_k = topk_ids(h_s, w, k, spec, self.cap)
            t_k = logits_at(h_t, w_t, ids, spec, self.cap)
        else:
            ids, t_k = topk_ids(h_t, w_t, k, spec, self.cap)
            s_k = logits_at(h_s, w, ids, spec, self.cap)
        with torch.enable_grad():
            a = s_k.detach().requires_grad_()
            if stats is None:
                loss = self.objective.support_rows(a, t_k, None, None)
                (g_k,), g_lse = torch.autograd.grad(loss.sum(), (a,)), None
            else:
                lse_s = stats[0].detach().requires_grad_()
                loss = self.objective.support_rows(a, t_k, lse_s, stats[1])
                g_k, g_lse = torch.autograd.grad(loss.sum(), (a, lse_s))
        self.ids, self.g_k, self.g_lse = ids, g_k * _cap_slope(s_k, self.cap, spec.inv_temperature), g_lse
        return loss.detach(), stats

    def backward(self, h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w):
        d_h, d_w = None, None
        if self.g_lse is not None:  # the tail bucket's log-sum-exp: a dense softmax term
            d_h, d_w = backward(h_s, h_t, w, w_t, stats, row_grad * self.g_lse, spec, shared, need_h, need_w,
                                cap=self.cap, kind="softmax")
        if need_h:
            d_h = d_h.float() if d_h is not None else torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device)
        if need_w:
            d_w = d_w.float() if d_w is not None else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        grad = self.g_k * row_grad[:, None]
        hidden = h_s.shape[1]
        for rows in _row_slices(h_s.shape[0], self.ids.shape[1] * hidden * 4):
            ids = self.ids[rows].reshape(-1)
            if need_h:
                picked = w.index_select(0, ids).view(-1, self.ids.shape[1], hidden).float()
                d_h[rows] += torch.bmm(grad[rows][:, None, :], picked).squeeze(1)
            if need_w:
                outer = grad[rows][:, :, None] * h_s[rows].float()[:, None, :]
                d_w.index_add_(0, ids, outer.reshape(-1, hidden))
        return (d_h.to(h_s.dtype) if need_h else None), (d_w.to(w.dtype) if need_w else None)


def kernels_for(objective, extra: dict, cap: float | None):
    """The kernels computing ``objective`` (its ``kernel`` id), with per-row inputs ``extra``."""
    if objective.kernel == "sampled_token":
        return SampledTokenKernels(extra["targets"], cap)
    if objective.kernel == "topk":
        return TopKKernels(objective, cap)
    return FullKernels(cap)
