"""The SDFT loss of one micro-batch: student vs teacher on every rollout token, one fused call."""
from __future__ import annotations

import torch

from sdft.models import decoder_of
from sdft.models.head import head_of
from sdft.prefix.packed import context_hidden, joint_pass_pays, joint_tree_hidden, supports_tree
from sdft_kernels import fused_linear_divergence

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


def sdft_batch_loss(student, teacher, batch, teacher_contexts, config, pad_id: int, passes: list | None = None):
    """Summed loss of the student against the teacher on ``batch`` (a ``RolloutBatch``).

    The step's loss is the sum over micro-batches divided by the summed ``normaliser``s. With
    ``sequence_mean`` each rollout's tokens carry 1 / its length, so every rollout weighs the same,
    as in TRL and the paper. The teacher (contexts with the demonstration) gets no gradient; both
    sides run the micro-batch's prefix tree, one tree for both when the teacher is the live student
    and sharing their common prefixes pays (``joint_pass_pays``). ``passes`` (a list) receives the
    token passes of each scoring pass (tree nodes, or padded-out tokens of the fallback passes).
    """
    mask = loss_mask(batch, config)
    decoder = decoder_of(student)
    args = (batch.prompts, teacher_contexts, batch.completions, batch.mask, pad_id)
    if (config.share_prefix and config.share_teacher_prefix and supports_tree(decoder)
            and teacher.is_student(decoder.config)
            and joint_pass_pays(decoder, *args, config.tree_attention)):
        s_hidden, t_hidden = joint_tree_hidden(decoder, *args, passes, config.tree_attention)
        t_head = None
    else:
        t_hidden, t_head = teacher.score(teacher_contexts, batch.completions, batch.mask, pad_id,
                                         config.share_prefix, passes, config.tree_attention)
        s_hidden = context_hidden(decoder, batch.prompts, batch.completions, batch.mask, pad_id, passes,
                                  config.share_prefix, config.tree_attention)
    head = head_of(student)
    dtype = compute_dtype(s_hidden.device, head.weight.dtype)
    kwargs = objective_kwargs(
        config.distillation_mode, mask, batch.completions, topk=config.distillation_topk,
        topk_support=config.distillation_topk_support, add_tail=config.distillation_add_tail,
        is_clip=config.distillation_is_clip, is_level=config.distillation_is_level, old_logprobs=batch.logprobs,
        sequence_mean=config.loss_normalization == "sequence_mean", dtype=dtype)
    return head_divergence(s_hidden, t_hidden, head, t_head, dtype, mask=mask, divergence=config.divergence,
                           beta=config.distillation_alpha, temperature=config.distillation_temperature, **kwargs)


def head_divergence(s_hidden, t_hidden, head, t_head, dtype: torch.dtype, **options) -> torch.Tensor:
    """The summed fused loss of student and teacher hidden states through their heads (``t_head`` None:
    the student's), computed in ``dtype`` (``compute_dtype``): inputs cast (differentiably, so fp32
    master weights get fp32 gradients), autocast off inside, where the op keeps fp32 accumulators."""
    with torch.autocast(s_hidden.device.type, enabled=False):
        return fused_linear_divergence(
            s_hidden.to(dtype), t_hidden.to(dtype), head.weight.to(dtype),
            None if t_head is None else t_head.weight.to(dtype), reduction="sum",
            **_cast(head_kwargs(head, t_head), dtype), **options)


def compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused op computes in: autocast's (bf16 mixed precision, master weights fp32) while it
    is on, else the head's own (fp32, or bf16 under FSDP2's mixed precision)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


def _cast(kwargs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def head_kwargs(head, t_head) -> dict:
    """The fused op's head keywords for a student head and a separate teacher head (or None: shared)."""
    kwargs = dict(bias=head.bias, logit_scale=head.logit_scale, softcap=head.softcap)
    if t_head is not None and (head.bias is not None or t_head.bias is not None):
        kwargs["teacher_bias"] = t_head.bias
    return kwargs


def objective_kwargs(distillation_mode: str, mask, completions, *, topk: int, topk_support: str = "student",
                     add_tail: bool = False, is_clip: float | None = None, is_level: str = "token",
                     old_logprobs=None, sequence_mean: bool = False, dtype=torch.float32) -> dict:
    """The fused op's objective keywords for a distillation mode (TRL's names and meanings), the
    importance-sampling correction when ``is_clip`` and ``old_logprobs`` are given, and the per-token
    weights 1 / (scored tokens of the rollout) of per-sequence means."""
    kwargs = dict(mode=KERNEL_MODES[distillation_mode])
    if distillation_mode == "topk_logits":
        kwargs.update(topk=topk, topk_support=topk_support, add_tail=add_tail)
    if distillation_mode == "sampled_token":
        kwargs["targets"] = completions
    if is_clip is not None and old_logprobs is not None:
        kwargs.update(targets=completions, old_logprobs=old_logprobs, is_clip=is_clip, is_level=is_level)
    if sequence_mean:
        lengths = mask.sum(1, keepdim=True).clamp(min=1).to(torch.promote_types(dtype, torch.float32))
        kwargs["weights"] = (1.0 / lengths).expand_as(mask)
    return kwargs


def divergence_from_alpha(alpha: float) -> tuple[str, float]:
    """TRL's ``distillation_alpha`` as (divergence, jsd beta): 0 forward KL, 1 reverse KL, else JSD."""
    return {0.0: ("forward_kl", 0.5), 1.0: ("reverse_kl", 0.5)}.get(alpha, ("jsd", alpha))
