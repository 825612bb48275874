"""Importance-sampling correction for rollouts sampled by an older policy.

Token level (TRL): each token's loss times ``min(exp(log p(y) - log p_old(y)), clip)``, detached, the
log-ratio clamped to [-20, 20] first. Sequence level (the paper): the ratios of a sequence's tokens
averaged, then capped at ``clip``, one weight for the whole sequence.
"""
from __future__ import annotations

import torch

from .base import Objective, token_logprob

LOG_RATIO_BOUND = 20.0


def clipped_ratio(log_p: torch.Tensor, old_logprobs: torch.Tensor, clip: float) -> torch.Tensor:
    ratio = torch.exp((log_p - old_logprobs).detach().clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    return ratio.clamp(max=clip)


class TokenImportance(Objective):
    """``inner``'s per-token loss times the clipped, detached token ratio."""

    def __init__(self, inner: Objective, clip: float):
        super().__init__(inner.spec)
        self.inner, self.clip = inner, clip
        self.needs = tuple(dict.fromkeys(inner.needs + ("targets", "old_logprobs")))

    def rows(self, s, t, extra):
        ratio = clipped_ratio(token_logprob(s.detach(), extra["targets"]), extra["old_logprobs"], self.clip)
        return self.inner.rows(s, t, extra) * ratio

    @property
    def terms_and_grad(self):
        if self.inner.terms_and_grad is None:
            return None

        def fast(s, t, extra, scratch=None):
            ratio = clipped_ratio(token_logprob(s, extra["targets"]), extra["old_logprobs"], self.clip)
            loss, grad = self.inner.terms_and_grad(s, t, extra, scratch)  # after the ratio: it consumes s
            return loss * ratio, grad.mul_(ratio.to(grad.dtype)[:, None])
        return fast


def sequence_importance_weights(log_p: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                                clip: float) -> torch.Tensor:
    """[B, L] weights: each sequence's mean token ratio over its masked tokens, capped at ``clip``."""
    ratio = torch.exp((log_p - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    ratio = torch.where(mask.bool(), ratio, torch.zeros_like(ratio))
    mean = ratio.sum(-1) / mask.sum(-1).clamp(min=1)
    return mean.clamp(max=clip)[:, None].expand_as(log_p)
