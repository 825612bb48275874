"""Fused kernels for Self-Distillation Fine-Tuning: LM head + student/teacher divergence."""
from .divergence import DIVERGENCES, REDUCTIONS, make_spec
from .fused_divergence import BACKENDS, fused_linear_divergence
from .objectives import IS_LEVELS, MODES, TOPK_SUPPORTS
from .reference import reference_linear_divergence

__all__ = [
    "BACKENDS",
    "DIVERGENCES",
    "IS_LEVELS",
    "MODES",
    "TOPK_SUPPORTS",
    "REDUCTIONS",
    "fused_linear_divergence",
    "make_spec",
    "reference_linear_divergence",
]
