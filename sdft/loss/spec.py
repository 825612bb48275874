"""What the SDFT loss computes, described once: built from sdft's config or from TRL's arguments, then
used by ``sdft.train``'s step and by ``FusedSDFTTrainer`` alike (the same mask rule, normalisation and
fused call, so the two cannot drift apart).

Mode names are TRL's everywhere above this module (``full_logits``, ``topk_logits``,
``sampled_token``; the config edge maps ``full`` / ``topk`` onto them); ``KERNEL_MODES`` is the one
table that translates them into the fused op's ``mode`` (top-k is the full-vocabulary mode on a
``topk`` support).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdft_kernels import fused_linear_divergence

KERNEL_MODES = {"full_logits": "full", "topk_logits": "full", "sampled_token": "sampled_token"}


def divergence_from_alpha(alpha: float) -> tuple[str, float]:
    """TRL's ``distillation_alpha`` as (divergence, jsd beta): 0 forward KL, 1 reverse KL, else JSD."""
    return {0.0: ("forward_kl", 0.5), 1.0: ("reverse_kl", 0.5)}.get(alpha, ("jsd", alpha))


@dataclass(frozen=True)
class LossSpec:
    """The objective (divergence, beta, temperature, mode with its top-k options, importance sampling),
    the mask rule (the first ``skip_tokens`` of each rollout do not count) and the normalisation
    (``sequence_mean``: each rollout weighs the same, as TRL and the paper; else each token)."""

    divergence: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    mode: str = "full_logits"
    topk: int = 100
    topk_support: str = "student"
    add_tail: bool = False
    is_clip: float | None = None
    is_level: str = "token"
    skip_tokens: int = 0
    sequence_mean: bool = False

    def __post_init__(self):
        if self.mode not in KERNEL_MODES:
            raise ValueError(f"distillation_mode={self.mode!r} is not fused by sdft; expected one of "
                             f"{', '.join(KERNEL_MODES)}")

    @classmethod
    def from_config(cls, config) -> LossSpec:
        """From a validated ``SDFTConfig``."""
        return cls(divergence=config.divergence, beta=config.distillation_alpha,
                   temperature=config.distillation_temperature, mode=config.distillation_mode,
                   topk=config.distillation_topk, topk_support=config.distillation_topk_support,
                   add_tail=config.distillation_add_tail, is_clip=config.distillation_is_clip,
                   is_level=config.distillation_is_level, skip_tokens=config.num_loss_tokens_to_skip,
                   sequence_mean=config.loss_normalization == "sequence_mean")

    @classmethod
    def from_trl(cls, args, temperature: float) -> LossSpec:
        """From TRL's ``SDFTConfig`` as TRL's own loss reads it: alpha as the divergence, the student's
        top-k support, token-level IS on reused rollouts, per-sequence then batch means."""
        divergence, beta = divergence_from_alpha(float(args.distillation_alpha))
        return cls(divergence=divergence, beta=beta, temperature=temperature, mode=args.distillation_mode,
                   topk=args.distillation_topk, add_tail=args.distillation_add_tail,
                   is_clip=args.distillation_is_clip, skip_tokens=args.num_loss_tokens_to_skip, sequence_mean=True)

    def mask(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """The rollout tokens that count: real ones, after the first ``skip_tokens``."""
        mask = completion_mask.bool().clone()
        mask[:, :self.skip_tokens] = False
        return mask

    def normaliser(self, completion_mask: torch.Tensor) -> int:
        """What a micro-batch adds to the step's divisor: its scored tokens, or (``sequence_mean``) its
        rollouts with at least one scored token."""
        mask = self.mask(completion_mask)
        return int((mask.sum(1) > 0).sum()) if self.sequence_mean else int(mask.sum())

    def objective_kwargs(self, mask, completions, old_logprobs=None, dtype=torch.float32) -> dict:
        """The fused op's keywords: the divergence, the mode in the kernel's terms, importance sampling
        when ``is_clip`` and rollout-time ``old_logprobs`` are given, and per-sequence weights
        1 / (scored tokens of the rollout)."""
        kwargs = dict(divergence=self.divergence, beta=self.beta, temperature=self.temperature,
                      mode=KERNEL_MODES[self.mode])
        if self.mode == "topk_logits":
            kwargs.update(topk=self.topk, topk_support=self.topk_support, add_tail=self.add_tail)
        if self.mode == "sampled_token":
            kwargs["targets"] = completions
        if self.is_clip is not None and old_logprobs is not None:
            kwargs.update(targets=completions, old_logprobs=old_logprobs, is_clip=self.is_clip,
                          is_level=self.is_level)
        if self.sequence_mean:
            lengths = mask.sum(1, keepdim=True).clamp(min=1).to(torch.promote_types(dtype, torch.float32))
            kwargs["weights"] = (1.0 / lengths).expand_as(mask)
        return kwargs

    def summed(self, s_hidden, t_hidden, head, t_head, completion_mask, completions, old_logprobs=None):
        """The summed loss of a micro-batch's rollouts [B, L] from the student's and the teacher's
        hidden states [B, L, H] through their heads (``sdft.models.head``; ``t_head`` None: shared)."""
        mask = self.mask(completion_mask)
        dtype = compute_dtype(s_hidden.device, head.weight.dtype)
        kwargs = self.objective_kwargs(mask, completions, old_logprobs, dtype)
        return head_divergence(s_hidden, t_hidden, head, t_head, dtype, mask=mask, **kwargs)


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
