"""Any objective (``sdft_kernels.objectives``), fused with the LM head chunk by chunk, on any device.

For each block of rows the [chunk, V] logits are formed, the objective's per-row formula is
evaluated and, when gradients are wanted, differentiated on that block only (by the objective's
hand-written ``terms_and_grad`` where it has one, else by autograd); dH and dW follow from two GEMMs,
as in ``torch_backend``. Nothing of size [N, V] is ever held. The
elementwise work autograd adds is small next to the three [chunk, H] x [H, V] GEMMs of each block.

``ChunkedObjective(objective, extra)`` has the backend interface ``fused_divergence`` drives
(``forward``, ``backward``, ``forward_with_grad``); ``extra`` holds the objective's per-row inputs,
already restricted to the selected rows.
"""
from __future__ import annotations

import torch

from .heads import soft_cap
from .logit_blocks import LogitBlocks, row_chunks
from .torch_backend import _upcast_heads


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
        """(per-row losses, dH, dW); ``row_grad`` (None: no gradients) weights each row's gradient."""
        dtype, w32, wt32 = _upcast_heads(h_s, h_t, w, w_t)
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
            if self.objective.terms_and_grad is not None:  # hand-written chunk math
                loss, gz = self.objective.terms_and_grad(s, t, extra)
                gz.mul_(row_grad[rows].to(dtype)[:, None])
            else:
                with torch.enable_grad():
                    s.requires_grad_(True)
                    loss = self.objective.rows(s, t, extra)
                    (gz,) = torch.autograd.grad(loss, s, grad_outputs=row_grad[rows].to(dtype))
            losses[rows] = loss.detach()
            if tanh is not None:  # through the cap: d cap*tanh(z/cap) / dz = 1 - tanh^2
                gz.mul_(tanh.square_().neg_().add_(1.0))
            if need_h:
                torch.mm(gz, w32, out=d_h[rows])
            if need_w:
                d_w.addmm_(gz.T, h_s[rows].to(dtype))
        return losses, d_h, d_w

    def forward(self, h_s, h_t, w, w_t, spec, shared=False):
        losses, _, _ = self._pass(h_s, h_t, w, w_t, spec, None, False, False)
        return losses, None

    def backward(self, h_s, h_t, w, w_t, stats, row_grad, spec, shared, need_h, need_w):
        """``row_grad`` already holds 1/T (the chain rule through the scaled logits)."""
        _, d_h, d_w = self._pass(h_s, h_t, w, w_t, spec, row_grad, need_h, need_w)
        return (d_h.to(h_s.dtype) if need_h else None, d_w.to(w.dtype) if need_w else None)

    def forward_with_grad(self, h_s, h_t, w, w_t, spec, need_h, need_w):
        """(summed loss, its dH, its dW) in one pass (no recompute)."""
        ones = torch.full((h_s.shape[0],), spec.inv_temperature, dtype=torch.float64, device=h_s.device)
        losses, d_h, d_w = self._pass(h_s, h_t, w, w_t, spec, ones, need_h, need_w)
        return losses.sum(), d_h, d_w

    def token_logprobs(self, h_s, w, spec) -> torch.Tensor:
        """log p(target) per row under the student, forward only (for sequence-level IS weights)."""
        from .objectives.base import token_logprob

        dtype = _upcast_heads(h_s, h_s, w, w)[0]
        out = torch.empty(h_s.shape[0], dtype=dtype, device=h_s.device)
        w32 = w.detach().to(dtype)
        with torch.no_grad():
            for rows in row_chunks(h_s.shape[0], w.shape[0]):
                s = soft_cap(h_s[rows].detach().to(dtype) @ w32.T, self.softcap)
                out[rows] = token_logprob(s * spec.inv_temperature, self.extra["targets"][rows])
        return out
