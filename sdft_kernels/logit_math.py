"""Per-row divergence terms and logit gradients from a block of (temperature-scaled) logits.

Used by the chunked PyTorch backend; the Triton kernels implement the same formulas tile by tile.
With p = softmax(s), q = softmax(t):

* reverse KL  d/ds_j = p_j (log p_j - log q_j - KL(p||q))
* forward KL  d/ds_j = p_j - q_j
* jsd         d/ds_j = (1 - beta) p_j (log p_j - log m_j - KL(p||m))

``c`` is the row scalar the gradient needs (KL(p||q) or KL(p||m); zero for forward KL).
"""
from __future__ import annotations

import math

import torch

from .divergence_spec import DivergenceSpec


def _log_mixture(log_p, log_q, beta):
    return torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))


def row_terms(s: torch.Tensor, t: torch.Tensor, spec: DivergenceSpec):
    """Return (loss, lse_s, lse_t, c) per row of the logit blocks ``s`` and ``t``."""
    lse_s = torch.logsumexp(s, dim=-1)
    lse_t = torch.logsumexp(t, dim=-1)
    log_p = s - lse_s[:, None]
    log_q = t - lse_t[:, None]
    if spec.kind == "reverse_kl":
        loss = (log_p.exp() * (log_p - log_q)).sum(-1)
        return loss, lse_s, lse_t, loss
    if spec.kind == "forward_kl":
        loss = (log_q.exp() * (log_q - log_p)).sum(-1)
        return loss, lse_s, lse_t, torch.zeros_like(loss)
    beta = spec.beta
    log_m = _log_mixture(log_p, log_q, beta)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_qm + (1 - beta) * kl_pm, lse_s, lse_t, kl_pm


def grad_from_logits(s, t, lse_s, lse_t, c, spec: DivergenceSpec) -> torch.Tensor:
    """d(row loss)/d(s) for each row, given that row's statistics."""
    log_p = s - lse_s[:, None]
    log_q = t - lse_t[:, None]
    p = log_p.exp()
    if spec.kind == "forward_kl":
        return p - log_q.exp()
    if spec.kind == "reverse_kl":
        return p * (log_p - log_q - c[:, None])
    log_m = _log_mixture(log_p, log_q, spec.beta)
    return (1 - spec.beta) * p * (log_p - log_m - c[:, None])


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Turn a logit block into probabilities in place; return each row's log-sum-exp."""
    peak = x.amax(-1, keepdim=True)
    x.sub_(peak).exp_()
    total = x.sum(-1, keepdim=True)
    x.div_(total)
    return (peak + total.log()).squeeze(-1)


def terms_and_grad(s: torch.Tensor, t: torch.Tensor, spec: DivergenceSpec, scratch: torch.Tensor | None = None):
    """(per-row loss, d(row loss)/d(s)) from one block of logits, in as few passes as possible.

    Consumes ``s`` and ``t`` (chunk temporaries): they are overwritten, and so is ``scratch`` (a
    block of their shape, or None: a fresh one). With d = s - t,
    KL(p||q) = <p, d> - lse_s + lse_t and KL(q||p) = -<q, d> + lse_s - lse_t.
    """
    if spec.kind == "jsd":
        loss, lse_s, lse_t, c = row_terms(s, t, spec)
        return loss, grad_from_logits(s, t, lse_s, lse_t, c, spec)
    d = torch.sub(s, t, out=scratch) if scratch is not None else s - t
    lse_s = _softmax_(s)  # s is now p
    if spec.kind == "forward_kl":
        lse_t = _softmax_(t)  # t is now q
        loss = lse_s - lse_t - d.mul_(t).sum(-1)  # <q, d>: an in-place product and a sum beat bmm
        return loss, s.sub_(t)
    peak = t.amax(-1)
    lse_t = peak + t.sub_(peak[:, None]).exp_().sum(-1).log()
    loss = torch.mul(s, d, out=t).sum(-1) - lse_s + lse_t  # <p, d>; t is free again
    return loss, d.sub_((lse_s - lse_t + loss)[:, None]).mul_(s)
