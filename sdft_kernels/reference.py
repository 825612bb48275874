"""Float64 materialized reference: full [N, V] logits and autograd. The oracle for every test."""
from __future__ import annotations

import torch

from .divergence import DivergenceSpec, divergence_of, make_spec
from .objectives import TokenImportance, make_objective, sequence_importance_weights
from .objectives.base import token_logprob


def divergence_from_logits(student_logits, teacher_logits, spec: DivergenceSpec) -> torch.Tensor:
    """Per-row divergence of softmax(student/T) against softmax(teacher/T), teacher detached."""
    log_p = torch.log_softmax(student_logits / spec.temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits.detach() / spec.temperature, dim=-1)
    return divergence_of(log_p, log_q, spec)


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
    *,
    mode="full",
    topk=None,
    topk_support="student",
    add_tail=False,
    targets=None,
    old_logprobs=None,
    is_clip=None,
    is_level="token",
    weights=None,
    bias=None,
    teacher_bias=None,
    logit_scale=1.0,
    softcap=None,
):
    """Same contract as ``fused_linear_divergence``, computed naively in float64."""
    spec = make_spec(divergence, beta, temperature)
    objective = make_objective(spec, mode=mode, topk=topk, topk_support=topk_support, add_tail=add_tail)
    t_weight = weight if teacher_weight is None else teacher_weight
    t_bias = bias if teacher_weight is None else teacher_bias
    lead = student_hidden.shape[:-1]

    def head(h, w, b):
        z = h.double() @ w.double().T
        if b is not None:
            z = z + b.double()
        z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return z.reshape(-1, weight.shape[0]) / spec.temperature

    s_logits = head(student_hidden, weight, bias)
    t_logits = head(teacher_hidden, t_weight, t_bias).detach()
    extra = {}
    if targets is not None:
        extra["targets"] = targets.reshape(-1).long()
    if old_logprobs is not None:
        extra["old_logprobs"] = old_logprobs.reshape(-1).double()
    if is_clip is not None and is_level == "token":
        objective = TokenImportance(objective, is_clip)
    rows = objective.rows(s_logits, t_logits, extra)
    keep = torch.ones(lead, dtype=torch.bool, device=rows.device) if mask is None else mask.bool()
    if is_clip is not None and is_level == "sequence":
        logp = token_logprob(s_logits.detach(), extra["targets"]).reshape(lead)
        rows = rows * sequence_importance_weights(logp, old_logprobs.double(), keep.double(), is_clip).reshape(-1)
    if weights is not None:
        rows = rows * weights.reshape(-1).double()
    rows = torch.where(keep.reshape(-1), rows, torch.zeros_like(rows)).reshape(lead)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1)
