"""Sampled-token estimator (TRL's ``sampled_token`` mode): reverse KL from the sampled ids only.

Per token: ``(log p(y) - log q(y)).detach() * log p(y)``, whose gradient is an unbiased estimate of
the reverse KL's on on-policy samples y. Needs only a log-sum-exp and an indexed read per side, like
a cut cross-entropy.
"""
from __future__ import annotations

from .base import Objective, token_logprob


class SampledToken(Objective):
    needs = ("targets",)

    def __init__(self, spec):
        if spec.kind != "reverse_kl":
            raise ValueError("mode='sampled_token' is a reverse-KL estimator: use divergence='reverse_kl' "
                             "(TRL: distillation_alpha=1.0)")
        super().__init__(spec)

    def rows(self, s, t, extra):
        log_p = token_logprob(s, extra["targets"])
        log_q = token_logprob(t, extra["targets"])
        return (log_p - log_q).detach() * log_p
