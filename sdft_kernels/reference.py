"""Float64 materialized reference: full [N, V] logits and autograd. The oracle for every test."""
from __future__ import annotations

import math

import torch

from .divergence_spec import DivergenceSpec, make_spec


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(a || b) from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def divergence_from_logits(student_logits, teacher_logits, spec: DivergenceSpec) -> torch.Tensor:
    """Per-row divergence of softmax(student/T) against softmax(teacher/T), teacher detached."""
    log_p = torch.log_softmax(student_logits / spec.temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits.detach() / spec.temperature, dim=-1)
    if spec.kind == "reverse_kl":
        return _kl(log_p, log_q)
    if spec.kind == "forward_kl":
        return _kl(log_q, log_p)
    beta = spec.beta
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
    return beta * _kl(log_q, log_m) + (1 - beta) * _kl(log_p, log_m)


def reference_linear_divergence(
    student_hidden,
    teacher_hidden,
    weight,
    teacher_weight=None,
    mask=None,
    divergence="reverse_kl",
    beta=0.5,
    temperature=1.0,
    reduction="mean",
):
    """Same contract as ``fused_linear_divergence``, computed naively in float64."""
    spec = make_spec(divergence, beta, temperature)
    t_weight = weight if teacher_weight is None else teacher_weight
    s_logits = student_hidden.double() @ weight.double().T
    t_logits = teacher_hidden.double() @ t_weight.double().T
    rows = divergence_from_logits(s_logits, t_logits, spec)
    keep = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask.bool()
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1)
