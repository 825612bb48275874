"""Which tokens a rollout may sample: a repetition penalty on the logits of tokens its sequence already
holds (prompt included), then top-k, top-p (nucleus) and min-p filtering of the tempered distribution, in
the order and with the ties transformers' logits processors use (penalty, temperature, then top-k, top-p,
min-p; each filter keeps at least the most likely token).

The log-probabilities a rollout records stay those of the whole tempered distribution: TRL's rollout
log-probs come from a forward pass of the student over the full vocabulary, and the importance-sampling
correction (``distillation_is_clip``) compares the student against them, so sdft records the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1: off
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability; 0: off
    repetition_penalty: float = 1.0  # a seen token's logit divided by it (multiplied when negative); 1: off

    @classmethod
    def from_config(cls, config) -> "Sampling":
        return cls(config.top_k, config.top_p, config.min_p, config.repetition_penalty)

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1.0

    def penalize(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """``logits`` [rows, V] with each ``seen`` [rows, V] token's logit divided by the penalty (multiplied
        when negative), as transformers' ``RepetitionPenaltyLogitsProcessor``."""
        penalized = torch.where(logits < 0, logits * self.repetition_penalty, logits / self.repetition_penalty)
        return torch.where(seen, penalized, logits)

    def restrict(self, log_p: torch.Tensor) -> torch.Tensor:
        """``log_p`` [rows, V] with every token outside the kept set at -inf (not renormalised)."""
        out = log_p
        if 0 < self.top_k < out.shape[-1]:
            kth = torch.topk(out, self.top_k, dim=-1).values[..., -1:]
            out = out.masked_fill(out < kth, float("-inf"))
        if self.top_p < 1.0:
            ascending, order = torch.sort(out, dim=-1, stable=True)
            cumulative = ascending.softmax(-1).cumsum(-1)
            drop = cumulative <= 1.0 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            out = out.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        if self.min_p > 0.0:
            probs = out.softmax(-1)
            drop = probs < self.min_p * probs.amax(-1, keepdim=True)
            out = out.masked_fill(drop, float("-inf"))
        return out
