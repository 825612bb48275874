"""Top-k divergence (TRL's ``compute_topk_self_distillation_loss``; tinker's teacher-support variant).

The support is the k ids with the largest student logits (``support="teacher"``: the teacher's);
both distributions are read on those ids. Without ``add_tail`` each is renormalised over the support;
with it, one extra bucket holds the mass outside (1 - captured mass), as TRL does. k >= V is the
full vocabulary.
"""
from __future__ import annotations

import torch

from ..divergence import _softmax_, divergence_of
from ..divergence import terms_and_grad as _hand_written
from .base import Objective


def add_tail_bucket(log_probs: torch.Tensor) -> torch.Tensor:
    """Append log(1 - captured mass) to top-k log-probs (TRL's clamp keeps the log finite)."""
    captured = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([log_probs, torch.log(-torch.expm1(captured))], dim=-1)


class TopK(Objective):
    kernel = "topk"  # triton_backend.TopKKernels (on backend="triton")

    def __init__(self, spec, k: int, support: str = "student", add_tail: bool = False):
        super().__init__(spec)
        self.k, self.support, self.add_tail = k, support, add_tail

    def rows(self, s, t, extra):
        k = min(self.k, s.shape[-1])
        ids = (s if self.support == "student" else t).detach().topk(k, dim=-1).indices
        return self.support_rows(s.gather(-1, ids), t.gather(-1, ids), torch.logsumexp(s, -1),
                                 torch.logsumexp(t, -1))

    def support_rows(self, s_k, t_k, lse_s, lse_t):
        """Per-row loss from the logits on the support [n, k] and each side's full log-sum-exp [n]
        (read only with the tail bucket: renormalising over the support cancels them)."""
        if self.add_tail:
            log_p = add_tail_bucket(s_k - lse_s[:, None])
            log_q = add_tail_bucket(t_k - lse_t[:, None])
        else:
            log_p = s_k - torch.logsumexp(s_k, -1, keepdim=True)
            log_q = t_k - torch.logsumexp(t_k, -1, keepdim=True)
        return divergence_of(log_p, log_q, self.spec)

    def terms_and_grad(self, s, t, extra, scratch=None):
        """Consumes s and t. Renormalised: the full-vocabulary math on the [n, k] support logits (the
        log-sum-exp over V cancels), scattered back. With the tail the loss also reads log-sum-exp(s),
        whose gradient is softmax(s): autograd on the [n, k] support and that one scalar per row."""
        k = min(self.k, s.shape[-1])
        ids = (s if self.support == "student" else t).topk(k, dim=-1).indices
        s_k, t_k = s.gather(-1, ids), t.gather(-1, ids)
        if not self.add_tail:
            loss, g_k = _hand_written(s_k, t_k, self.spec)
            return loss, s.zero_().scatter_(-1, ids, g_k)
        lse_t = torch.logsumexp(t, -1, keepdim=True)
        with torch.enable_grad():
            a = s_k.requires_grad_()
            lse_s = _softmax_(s)[:, None].requires_grad_()  # s is now softmax(s)
            log_p = add_tail_bucket(a - lse_s)
            log_q = add_tail_bucket(t_k - lse_t)
            loss = divergence_of(log_p, log_q, self.spec)
            g_a, g_lse = torch.autograd.grad(loss.sum(), (a, lse_s))
        return loss.detach(), s.mul_(g_lse).scatter_add_(-1, ids, g_a)
