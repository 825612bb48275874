"""SDFT objectives: each one object with its per-row formula, used both as the float64 reference
(on materialised logits) and as the chunk math of the fused op (on [chunk, V] logit blocks).

``kernel``: ``"full"`` objectives also have hand-written kernels (``sdft_kernels.divergence`` on the CPU, Triton
on a GPU); the others run through ``sdft_kernels.chunked``, which differentiates the same formula
chunk by chunk, on any device, never holding more than a chunk of logits.
"""
from __future__ import annotations

from ..divergence import divergence_of
from .base import Objective, Weighted
from .full_vocab import FullVocab
from .importance import TokenImportance, sequence_importance_weights
from .sampled_token import SampledToken
from .topk import TopK

MODES = ("full", "sampled_token")
TOPK_SUPPORTS = ("student", "teacher")
IS_LEVELS = ("token", "sequence")


def make_objective(spec, *, mode: str = "full", topk: int | None = None, topk_support: str = "student",
                   add_tail: bool = False) -> Objective:
    """The objective for these options, after checking them (one-line ``ValueError`` otherwise)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive integer or None, got {topk!r}")
    if topk_support not in TOPK_SUPPORTS:
        raise ValueError(f"unknown topk_support {topk_support!r}; expected one of {', '.join(TOPK_SUPPORTS)}")
    if add_tail and topk is None:
        raise ValueError("add_tail needs topk (the tail is the mass outside the top-k support)")
    if mode == "sampled_token":
        if topk is not None:
            raise ValueError("mode='sampled_token' scores the sampled token only; it takes no topk")
        return SampledToken(spec)
    if topk is not None:
        return TopK(spec, topk, topk_support, add_tail)
    return FullVocab(spec)


__all__ = ["FullVocab", "IS_LEVELS", "MODES", "Objective", "SampledToken", "TOPK_SUPPORTS", "TokenImportance",
           "TopK", "Weighted", "divergence_of", "make_objective", "sequence_importance_weights"]
