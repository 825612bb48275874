"""Any objective (``sdft_kernels.objectives``), fused with the LM head chunk by chunk, on any device: the
CPU path of every objective and the fallback of the Triton kernels.

Rows are processed a chunk at a time so only [chunk, V] logits exist at once, in blocks reused from
chunk to chunk (``logit_blocks``). For each block the objective's per-row formula is evaluated and,
when gradients are wanted, differentiated on that block only: by the objective's hand-written
``terms_and_grad`` where it has one (the full-vocabulary divergences: ``sdft_kernels.divergence``),
else by autograd; dH and dW follow from two GEMMs. Two ways to train:

* ``forward_with_grad`` (a scalar loss, what training uses): each chunk's logits give its loss and,
  right away, its logit gradient, hence dH and dW; nothing is recomputed: 8*N*H*V FLOPs in all.
* ``forward`` + ``backward`` (per-row losses, ``reduction="none"``, whose upstream gradient is only
  known later): the backward recomputes the logits of each chunk (12*N*H*V FLOPs).

``ChunkedObjective(objective, extra)`` has the backend interface ``fused_divergence`` drives;
``extra`` holds the objective's per-row inputs, already restricted to the selected rows.
"""
from __future__ import annotations

import torch

from .heads import soft_cap
from .logit_blocks import LogitBlocks, row_chunks


def upcast_heads(h_s, h_t, w, w_t):
    """(compute dtype: at least float32, student head, teacher head in it)."""
    dtype = torch.float32
    for x in (h_s, h_t, w, w_t):
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype, w.to(dtype), w_t.to(dtype)


class ChunkedObjective:
    """``softcap``: Gemma-2 style ``cap * tanh(z / cap)`` on the raw logits z before the objective."""

    def __init__(self, objective, extra: dict[str, torch.Tensor], softcap: float | None = None):
        self.objective, self.extra, self.softcap = objective, extra, softcap

    def _logits(self, blocks, h_s, h_t, w32, wt32, rows, spec, dtype):
        if self.softcap is None:
            return blocks.logits(h_s, h_t, w32, wt32, rows, spec.inv_temperature) + (None,)
        cap = self.softcap
        tanh = torch.tanh((h_s[rows].to(dtype) @ w32.T) / cap)
        s = tanh * (cap * spec.inv_temperature)
        t = torch.tanh((h_t[rows].to(dtype) @ wt32.T) / cap) * (cap * spec.inv_temperature)
        return s, t, tanh

    def _pass(self, h_s, h_t, w, w_t, spec, row_grad, need_h, need_w):
        """(per-row losses, dH, dW). ``row_grad`` weights each row's gradient: a tensor [N], a float
        for every row alike, or None (no gradients)."""
        dtype, w32, wt32 = upcast_heads(h_s, h_t, w, w_t)
        n = h_s.shape[0]
        losses = torch.empty(n, dtype=dtype, device=h_s.device)
        d_h = torch.empty(h_s.shape, dtype=dtype, device=h_s.device) if need_h else None
        grads = row_grad is not None and (need_h or need_w)
        blocks = LogitBlocks(n, w.shape[0], dtype, h_s.device)
        d_w = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_w else None
        for rows in blocks.chunks:
            s, t, tanh = self._logits(blocks, h_s.detach(), h_t, w32.detach(), wt32, rows, spec, dtype)
            extra = {k: v[rows] for k, v in self.extra.items()}
            if not grads:
                with torch.no_grad():
                    losses[rows] = self.objective.rows(s, t, extra)
                continue
            scale = row_grad if isinstance(row_grad, float) else row_grad[rows].to(dtype)
            if self.objective.terms_and_grad is not None:  # hand-written chunk math
                loss, gz = self.objective.terms_and_grad(s, t, extra, blocks.scratch(rows))
                if isinstance(scale, torch.Tensor):
                    gz.mul_(scale[:, None])
                elif scale != 1.0:
                    gz.mul_(scale)
            else:
                with torch.enable_grad():
                    s.requires_grad_(True)
                    loss = self.objective.rows(s, t, extra)
                    weight = scale if isinstance(scale, torch.Tensor) else torch.full_like(loss, scale)
                    (gz,) = torch.autograd.grad(loss, s, grad_outputs=weight)
            losses[rows] = loss.detach()
            if tanh is not None:  # through the cap: d cap*tanh(z/cap) / dz = 1 - tanh^2
                gz.mul_(tanh.square_().neg_().add_(1.0))
            if need_h:
                torch.mm(gz, w32, out=d_h[rows])
            if need_w:
                d_w.addmm_(gz.T, h_s[rows].to(dtype))
        return losses, d_h, d_w

    def forward(self, h_s, h_t, w, w_t, spec, shared=False):
        """Per-row losses [N] and no saved statistics (the backward recomputes the logits)."""
        losses, _, _ = self._pass(h_s, h_t, w, w_t, spec, None, False, False)
        return losses, None

    def backward(self, h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w):
        """``row_grad`` already holds 1/T (the chain rule through the scaled logits)."""
        _, d_h, d_w = self._pass(h_s, h_t, w, w_t, spec, row_grad, need_h, need_w)
        return (d_h.to(h_s.dtype) if need_h else None, d_w.to(w.dtype) if need_w else None)

    def forward_with_grad(self, h_s, h_t, w, w_t, spec, need_h, need_w):
        """(summed loss, its dH, its dW) in one pass (no recompute)."""
        losses, d_h, d_w = self._pass(h_s, h_t, w, w_t, spec, spec.inv_temperature, need_h, need_w)
        return losses.sum(), d_h, d_w

    def token_logprobs(self, h_s, w, spec) -> torch.Tensor:
        """log p(target) per row under the student, forward only (for sequence-level IS weights)."""
        from .objectives.base import token_logprob

        dtype = upcast_heads(h_s, h_s, w, w)[0]
        out = torch.empty(h_s.shape[0], dtype=dtype, device=h_s.device)
        w32 = w.detach().to(dtype)
        with torch.no_grad():
            for rows in row_chunks(h_s.shape[0], w.shape[0]):
                s = soft_cap(h_s[rows].detach().to(dtype) @ w32.T, self.softcap)
                out[rows] = token_logprob(s * spec.inv_temperature, self.extra["targets"][rows])
        return out
