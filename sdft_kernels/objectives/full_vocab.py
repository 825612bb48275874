"""Full-vocabulary divergence (TRL's ``full_logits``): the paper's objective."""
from __future__ import annotations

import torch

from ..divergence import divergence_of
from ..divergence import terms_and_grad as _hand_written
from .base import Objective


class FullVocab(Objective):
    kernel = "full"  # hand-written chunk math (sdft_kernels.divergence) and Triton kernels exist for it

    def rows(self, s, t, extra):
        return divergence_of(torch.log_softmax(s, -1), torch.log_softmax(t, -1), self.spec)

    def terms_and_grad(self, s, t, extra, scratch=None):
        return _hand_written(s, t, self.spec, scratch)
