"""Chunked PyTorch backend: exact, bounded memory, used automatically on the CPU.

Rows are processed ``chunk`` at a time so only [chunk, V] logits exist at once, in blocks reused
from chunk to chunk (``logit_blocks``). Two ways to train:

* ``forward_with_grad`` (a scalar loss, what training uses): each chunk's logits give its loss and,
  right away, its logit gradient, hence dH and dW; nothing is recomputed: 8*N*H*V FLOPs in all.
* ``forward`` + ``backward`` (per-row losses, ``reduction="none"``, whose upstream gradient is only
  known later): the forward keeps three floats per row (lse_s, lse_t, c) and the backward recomputes
  the logits of each chunk (12*N*H*V FLOPs).
"""
from __future__ import annotations

import torch

from .divergence_spec import DivergenceSpec
from .logit_blocks import LogitBlocks
from .logit_math import grad_from_logits, row_terms, terms_and_grad


def _compute_dtype(*tensors):
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _upcast_heads(h_s, h_t, w, w_t):
    """(compute dtype, student head, teacher head) in at least float32."""
    dtype = _compute_dtype(h_s, h_t, w, w_t)
    return dtype, w.to(dtype), w_t.to(dtype)


def forward(h_s, h_t, w, w_t, spec: DivergenceSpec, shared: bool = False):
    """Per-row losses [N] and the statistics [3, N] the backward needs (``shared``: unused, same
    signature as the Triton backend)."""
    dtype, w32, wt32 = _upcast_heads(h_s, h_t, w, w_t)
    n = h_s.shape[0]
    loss = torch.empty(n, dtype=dtype, device=h_s.device)
    stats = torch.empty(3, n, dtype=dtype, device=h_s.device)
    blocks = LogitBlocks(n, w.shape[0], dtype, h_s.device)
    for rows in blocks.chunks:
        s, t = blocks.logits(h_s, h_t, w32, wt32, rows, spec.inv_temperature)
        loss[rows], stats[0, rows], stats[1, rows], stats[2, rows] = row_terms(s, t, spec)
    return loss, stats


def backward(h_s, h_t, w, w_t, stats, row_grad, spec: DivergenceSpec, shared: bool, need_h: bool, need_w: bool):
    """Gradients for student hidden and weight; ``row_grad`` already holds 1/T."""
    dtype, w32, wt32 = _upcast_heads(h_s, h_t, w, w_t)
    d_h = torch.zeros(h_s.shape, dtype=dtype, device=h_s.device) if need_h else None
    blocks = LogitBlocks(h_s.shape[0], w.shape[0], dtype, h_s.device)
    d_w = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_w else None
    for rows in blocks.chunks:
        s, t = blocks.logits(h_s, h_t, w32, wt32, rows, spec.inv_temperature)
        gz = grad_from_logits(s, t, stats[0, rows], stats[1, rows], stats[2, rows], spec)
        gz *= row_grad[rows].to(dtype)[:, None]
        if need_h:
            d_h[rows] = gz @ w32
        if need_w:
            d_w.addmm_(gz.T, h_s[rows].to(dtype))
    return (
        d_h.to(h_s.dtype) if need_h else None,
        d_w.to(w.dtype) if need_w else None,
    )


def forward_with_grad(h_s, h_t, w, w_t, spec: DivergenceSpec, need_h: bool, need_w: bool):
    """(summed loss, d(sum)/d h_s, d(sum)/d w) in one pass over the row chunks (no recompute)."""
    dtype, w32, wt32 = _upcast_heads(h_s, h_t, w, w_t)
    total = torch.zeros((), dtype=dtype, device=h_s.device)
    d_h = torch.empty(h_s.shape, dtype=dtype, device=h_s.device) if need_h else None
    blocks = LogitBlocks(h_s.shape[0], w.shape[0], dtype, h_s.device)
    d_w = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_w else None
    for rows in blocks.chunks:
        s, t = blocks.logits(h_s, h_t, w32, wt32, rows, spec.inv_temperature)
        loss, gz = terms_and_grad(s, t, spec, scratch=blocks.scratch(rows))
        total += loss.sum()
        if spec.inv_temperature != 1.0:
            gz.mul_(spec.inv_temperature)
        if need_h:
            torch.mm(gz, w32, out=d_h[rows])
        if need_w:
            d_w.addmm_(gz.T, h_s[rows].to(dtype))
    return total, d_h, d_w
