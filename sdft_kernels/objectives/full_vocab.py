"""Full-vocabulary divergence (TRL's ``full_logits``): the paper's objective."""
from __future__ import annotations

import torch

from ..logit_math import terms_and_grad as _hand_written
from .base import Objective, divergence_of


class FullVocab(Objective):
    kernel = "full"  # hand-written chunk math (logit_math) and Triton kernels exist for it

    def rows(self, s, t, extra):
        return divergence_of(torch.log_softmax(s, -1), torch.log_softmax(t, -1), self.spec)

    def terms_and_grad(self, s, t, extra):
        return _hand_written(s, t, self.spec)
