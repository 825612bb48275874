"""What every objective provides (its divergence formulas are ``sdft_kernels.divergence``'s)."""
from __future__ import annotations

import torch

from ..divergence import DivergenceSpec


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

    # Optional fast path: ``terms_and_grad(s, t, extra, scratch=None) -> (rows, d rows / d s)`` written
    # by hand, allowed to overwrite ``s``, ``t`` and ``scratch`` (a free block of their shape, or None);
    # ``sdft_kernels.chunked`` uses it instead of autograd.
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

        def fast(s, t, extra, scratch=None):
            loss, grad = self.inner.terms_and_grad(s, t, extra, scratch)
            w = extra["weights"].to(grad.dtype)
            return loss * w, grad.mul_(w[:, None])
        return fast
