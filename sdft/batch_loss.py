"""The SDFT loss of one micro-batch: student vs teacher on every rollout token, one fused call."""
from __future__ import annotations

from sdft_kernels import fused_linear_divergence

from .batch_prefix import batched_unshared_hidden, shared_prefix_hidden
from .model_parts import decoder_of, lm_head_weight


def sdft_batch_loss(student, teacher, batch, teacher_contexts, config, pad_id: int):
    """Summed per-token divergence of the student from the teacher on ``batch`` (a ``RolloutBatch``).

    The teacher (contexts with the demonstration) gets no gradient; both sides run each context once
    per G rollouts when ``config.share_prefix`` (the default).
    """
    t_hidden = teacher.hidden(teacher_contexts, batch.completions, batch.mask, pad_id, config.share_prefix)
    fn = shared_prefix_hidden if config.share_prefix else batched_unshared_hidden
    s_hidden = fn(decoder_of(student), batch.prompts, batch.completions, batch.mask, pad_id)
    weight = lm_head_weight(student)
    return fused_linear_divergence(
        s_hidden, t_hidden.to(weight.dtype), weight, teacher.head_weight(), mask=batch.mask,
        divergence=config.divergence, beta=config.distillation_alpha,
        temperature=config.distillation_temperature, reduction="sum")
