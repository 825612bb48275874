"""The SDFT loss of one micro-batch: student vs teacher on every rollout token, one fused call."""
from __future__ import annotations

import torch

from sdft_kernels import fused_linear_divergence

from .batch_prefix import (batched_unshared_hidden, joint_pass_pays, joint_tree_hidden, shared_prefix_hidden,
                           supports_tree)
from .lm_head import head_of
from .model_parts import decoder_of

KERNEL_MODES = {"full_logits": "full", "topk_logits": "full", "sampled_token": "sampled_token"}


def loss_mask(batch, config) -> torch.Tensor:
    """The rollout tokens that count: real ones, after the first ``num_loss_tokens_to_skip``."""
    mask = batch.mask.clone()
    mask[:, :config.num_loss_tokens_to_skip] = False
    return mask


def normaliser(batch, config) -> int:
    """What a micro-batch adds to the step's divisor: its scored tokens (``token_mean``) or its
    rollouts with at least one scored token (``sequence_mean``)."""
    mask = loss_mask(batch, config)
    if config.loss_normalization == "sequence_mean":
        return int((mask.sum(1) > 0).sum())
    return int(mask.sum())


def sdft_batch_loss(student, teacher, batch, teacher_contexts, config, pad_id: int):
    """Summed loss of the student against the teacher on ``batch`` (a ``RolloutBatch``).

    The step's loss is the sum over micro-batches divided by the summed ``normaliser``s. With
    ``sequence_mean`` each rollout's tokens carry 1 / its length, so every rollout weighs the same,
    as in TRL and the paper. The teacher (contexts with the demonstration) gets no gradient; both
    sides run the micro-batch's prefix tree, one tree for both when the teacher is the live student
    and sharing their common prefixes pays (``joint_pass_pays``).
    """
    mask = loss_mask(batch, config)
    decoder = decoder_of(student)
    args = (batch.prompts, teacher_contexts, batch.completions, batch.mask, pad_id)
    if (config.share_prefix and supports_tree(decoder) and teacher.is_student(decoder.config)
            and joint_pass_pays(decoder, *args)):
        s_hidden, t_hidden = joint_tree_hidden(decoder, *args)
    else:
        t_hidden = teacher.hidden(teacher_contexts, batch.completions, batch.mask, pad_id, config.share_prefix)
        fn = shared_prefix_hidden if config.share_prefix else batched_unshared_hidden
        s_hidden = fn(decoder, batch.prompts, batch.completions, batch.mask, pad_id)
    head, t_head = head_of(student), teacher.head()
    weight = head.weight
    kwargs = dict(bias=head.bias, logit_scale=head.logit_scale, softcap=head.softcap)
    if t_head is not None and (head.bias is not None or t_head.bias is not None):
        kwargs["teacher_bias"] = t_head.bias
    if config.distillation_mode == "topk_logits":
        kwargs.update(topk=config.distillation_topk, topk_support=config.distillation_topk_support,
                      add_tail=config.distillation_add_tail)
    if config.distillation_mode == "sampled_token" or config.distillation_is_clip is not None:
        kwargs["targets"] = batch.completions
    if config.distillation_is_clip is not None:
        kwargs.update(old_logprobs=batch.logprobs, is_clip=config.distillation_is_clip,
                      is_level=config.distillation_is_level)
    if config.loss_normalization == "sequence_mean":
        lengths = mask.sum(1, keepdim=True)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        kwargs["weights"] = (1.0 / lengths.clamp(min=1).to(dtype)).expand_as(mask)
    return fused_linear_divergence(
        s_hidden, t_hidden.to(weight.dtype), weight, None if t_head is None else t_head.weight, mask=mask,
        divergence=config.divergence, beta=config.distillation_alpha,
        temperature=config.distillation_temperature, reduction="sum",
        mode=KERNEL_MODES[config.distillation_mode], **kwargs)
