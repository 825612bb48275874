"""Sampled-token estimator (TRL's ``sampled_token`` mode): reverse KL from the sampled ids only.

Per token: ``(log p(y) - log q(y)).detach() * log p(y)``, whose gradient is an unbiased estimate of
the reverse KL's on on-policy samples y. Needs only a log-sum-exp and an indexed read per side, like
a cut cross-entropy.
"""
from __future__ import annotations

from ..divergence import _softmax_
from .base import Objective, token_logprob


class SampledToken(Objective):
    needs = ("targets",)
    kernel = "sampled_token"  # triton_backend.SampledTokenKernels

    def __init__(self, spec):
        if spec.kind != "reverse_kl":
            raise ValueError("mode='sampled_token' is a reverse-KL estimator: use divergence='reverse_kl' "
                             "(TRL: distillation_alpha=1.0)")
        super().__init__(spec)

    def rows(self, s, t, extra):
        log_p = token_logprob(s, extra["targets"])
        log_q = token_logprob(t, extra["targets"])
        return (log_p - log_q).detach() * log_p

    def terms_and_grad(self, s, t, extra, scratch=None):
        """d rows / d s = c (onehot(y) - p) with c = log p(y) - log q(y); consumes s and t."""
        y = extra["targets"][:, None]
        s_y, t_y = s.gather(1, y).squeeze(1), t.gather(1, y).squeeze(1)
        peak = t.amax(-1)
        log_q = t_y - peak - t.sub_(peak[:, None]).exp_().sum(-1).log()
        log_p = s_y - _softmax_(s)  # s is now p
        c = log_p - log_q
        grad = s.mul_(-c[:, None])
        grad.scatter_add_(1, y, c[:, None])
        return c * log_p, grad
