"""The SDFT loss of one prompt group: student vs teacher over the G rollouts' tokens (summed)."""
from __future__ import annotations

from sdft_kernels import fused_linear_divergence
from sdft_kernels.prefix_sharing import shared_prefix_hidden, unshared_hidden

from .model_parts import decoder_of, lm_head_weight


def group_loss(student, teacher, rollouts, teacher_context_ids, config):
    """Summed per-token divergence of the student from the teacher on ``rollouts``; teacher gets no grad."""
    t_hidden = teacher.hidden(teacher_context_ids, rollouts.completions, rollouts.mask, config.share_prefix)
    fn = shared_prefix_hidden if config.share_prefix else unshared_hidden
    s_hidden = fn(decoder_of(student), rollouts.prompt_ids, rollouts.completions, rollouts.mask)
    weight = lm_head_weight(student)
    t_weight = teacher.head_weight()
    return fused_linear_divergence(
        s_hidden, t_hidden.to(weight.dtype), weight, t_weight, mask=rollouts.mask,
        divergence=config.divergence, beta=config.distillation_alpha,
        temperature=config.distillation_temperature, reduction="sum")
