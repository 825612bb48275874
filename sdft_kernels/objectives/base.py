"""What every objective provides, and the divergences on log-probability vectors they share."""
from __future__ import annotations

import math

import torch

from ..divergence_spec import DivergenceSpec


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
    beta = spec.beta
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
    return beta * _kl(log_q, log_m) + (1 - beta) * _kl(log_p, log_m)


def token_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row: an indexed read and a log-sum-exp."""
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class Objective:
    """A per-token SDFT loss of (temperature-scaled) student logits ``s`` and teacher logits ``t``.

    ``rows(s, t, extra)`` returns one loss per row, differentiable in ``s`` (the teacher is
    constant); ``extra`` holds per-row inputs (``targets``: sampled ids, ...). ``needs`` names the
    extra inputs it reads.
    """

    kernel: str | None = None
    needs: tuple[str, ...] = ()

    def __init__(self, spec: DivergenceSpec):
        self.spec = spec

    def rows(self, s: torch.Tensor, t: torch.Tensor, extra: dict) -> torch.Tensor:
        raise NotImplementedError

    # Optional fast path: ``terms_and_grad(s, t, extra) -> (rows, d rows / d s)`` written by hand,
    # allowed to overwrite ``s`` and ``t``; ``sdft_kernels.chunked`` uses it instead of autograd.
    terms_and_grad = None


class Weighted(Objective):
    """``inner``'s per-token loss times a given constant per-row weight (``extra["weights"]``)."""

    def __init__(self, inner: Objective):
        super().__init__(inner.spec)
        self.inner = inner
        self.needs = tuple(dict.fromkeys(inner.needs + ("weights",)))

    def rows(self, s, t, extra):
        return self.inner.rows(s, t, extra) * extra["weights"]

    @property
    def terms_and_grad(self):
        if self.inner.terms_and_grad is None:
            return None

        def fast(s, t, extra):
            loss, grad = self.inner.terms_and_grad(s, t, extra)
            w = extra["weights"].to(grad.dtype)
            return loss * w, grad.mul_(w[:, None])
        return fast
