"""The divergences, in one place: which one (``DivergenceSpec``, validated once), its formula on
log-probabilities (``divergence_of``: the float64 reference and every objective's chunk math), its
hand-written chunk gradient (``row_terms``, ``grad_from_logits``, ``terms_and_grad``: the CPU path) and
its id in the Triton kernels (``KERNEL_KIND``; ``triton_kernels`` implements the same formulas tile
by tile).

Conventions (the same as TRL's ``generalized_jsd_loss`` and liger's JSD, so users can switch):
p is the student distribution, q the teacher's.

* ``reverse_kl``: KL(p || q), the SDFT paper's default (mode seeking, on-policy).
  d/ds_j = p_j (log p_j - log q_j - KL(p||q))
* ``forward_kl``: KL(q || p).  d/ds_j = p_j - q_j
* ``jsd``: beta * KL(q || m) + (1 - beta) * KL(p || m) with m = beta * q + (1 - beta) * p.
  As in TRL and liger, beta == 0 means forward KL and beta == 1 reverse KL.
  d/ds_j = (1 - beta) p_j (log p_j - log m_j - KL(p||m))

``c`` is the row scalar the gradient needs (KL(p||q) or KL(p||m); zero for forward KL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
# Each divergence's id in the Triton kernels (their KIND constant; 3 and 4 are triton_backend's own).
KERNEL_KIND = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class DivergenceSpec:
    """A validated divergence: ``kind`` is one of reverse_kl, forward_kl, jsd (0 < beta < 1)."""

    kind: str
    beta: float
    temperature: float

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature


def make_spec(divergence: str, beta: float = 0.5, temperature: float = 1.0) -> DivergenceSpec:
    """Validate the user's choice and fold jsd's end points into the two KLs."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    beta = float(beta)
    if not (0.0 <= beta <= 1.0) or math.isnan(beta):
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    return DivergenceSpec(divergence, beta, temperature)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(a || b) from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def divergence_of(log_p: torch.Tensor, log_q: torch.Tensor, spec: DivergenceSpec) -> torch.Tensor:
    """Per-row divergence of the student's log-probs ``log_p`` from the teacher's ``log_q`` (same
    support): reverse KL(p||q), forward KL(q||p), or jsd with m = beta q + (1 - beta) p."""
    if spec.kind == "reverse_kl":
        return _kl(log_p, log_q)
    if spec.kind == "forward_kl":
        return _kl(log_q, log_p)
    log_m = _log_mixture(log_p, log_q, spec.beta)
    return spec.beta * _kl(log_q, log_m) + (1 - spec.beta) * _kl(log_p, log_m)


def _log_mixture(log_p, log_q, beta):
    """log m, m = beta q + (1 - beta) p."""
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
