"""Clear errors for bad inputs to the fused divergence, raised before any kernel runs."""
from __future__ import annotations

import torch

from .divergence import REDUCTIONS


def _fail(message: str):
    raise ValueError(message)


def check_inputs(student_hidden, teacher_hidden, weight, teacher_weight, mask, reduction):
    """Validate shapes, dtypes and devices; return the teacher head actually used."""
    named = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden, "weight": weight}
    if teacher_weight is not None:
        named["teacher_weight"] = teacher_weight
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if reduction not in REDUCTIONS:
        _fail(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    devices = {name: t.device for name, t in named.items()}
    if mask is not None:
        devices["mask"] = mask.device
    if len(set(devices.values())) > 1:
        _fail("all inputs must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items()))
    if weight.dim() != 2:
        _fail(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if student_hidden.dim() < 1 or student_hidden.shape[-1] != weight.shape[1]:
        _fail(f"student_hidden has hidden size {student_hidden.shape[-1] if student_hidden.dim() else None} "
              f"but weight is [vocab={weight.shape[0]}, hidden={weight.shape[1]}]")
    t_weight = weight if teacher_weight is None else teacher_weight
    if t_weight.dim() != 2 or t_weight.shape[0] != weight.shape[0]:
        _fail(f"teacher_weight must be [vocab={weight.shape[0]}, hidden_t], got shape {tuple(t_weight.shape)}")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        _fail(f"teacher_hidden has leading shape {tuple(teacher_hidden.shape[:-1])} but student_hidden has "
              f"{tuple(student_hidden.shape[:-1])}: one teacher row per student token is needed")
    if teacher_hidden.shape[-1] != t_weight.shape[1]:
        head = "weight (shared head)" if teacher_weight is None else "teacher_weight"
        _fail(f"teacher_hidden has hidden size {teacher_hidden.shape[-1]} but {head} expects {t_weight.shape[1]}")
    if student_hidden.dtype != weight.dtype:
        _fail(f"student_hidden is {student_hidden.dtype} but weight is {weight.dtype}; cast one of them")
    if teacher_hidden.dtype != t_weight.dtype:
        head = "weight (shared head)" if teacher_weight is None else "teacher_weight"
        _fail(f"teacher_hidden is {teacher_hidden.dtype} but {head} is {t_weight.dtype}; cast one of them")
    if mask is not None:
        if mask.shape != student_hidden.shape[:-1]:
            _fail(f"mask has shape {tuple(mask.shape)} but the tokens have shape {tuple(student_hidden.shape[:-1])}")
        if mask.is_floating_point() or mask.is_complex():
            _fail(f"mask must be bool or integer 0/1, got {mask.dtype}")
    return t_weight


def check_row_inputs(lead, vocab: int, device, **tensors) -> dict[str, torch.Tensor]:
    """Per-token inputs (``targets`` ids in [0, V), float ``old_logprobs`` / ``weights``), each of the
    tokens' shape ``lead`` and on their device; returned flattened, None ones left out."""
    out = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != lead:
            _fail(f"{name} has shape {tuple(t.shape)} but the tokens have shape {tuple(lead)}")
        if t.device != device:
            _fail(f"{name} is on {t.device} but the tokens are on {device}")
        if name == "targets":
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                _fail(f"targets must hold integer token ids, got {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
                _fail(f"targets must lie in [0, {vocab}), got ids from {int(t.min())} to {int(t.max())}")
            t = t.long()
        elif not t.is_floating_point():
            _fail(f"{name} must be a floating-point tensor, got {t.dtype}")
        out[name] = t.reshape(-1)
    return out


def check_importance(is_clip, is_level, targets, old_logprobs, lead):
    """The importance-sampling options: a positive clip, a known level, and the inputs it reads."""
    from .objectives import IS_LEVELS

    if is_level not in IS_LEVELS:
        _fail(f"unknown is_level {is_level!r}; expected one of {', '.join(IS_LEVELS)}")
    if is_clip is None:
        if old_logprobs is not None:
            _fail("old_logprobs is given but is_clip is None: set is_clip to apply the importance-sampling correction")
        return
    if isinstance(is_clip, bool) or not isinstance(is_clip, (int, float)) or not is_clip > 0 or is_clip == float("inf"):
        _fail(f"is_clip must be a positive finite number or None, got {is_clip!r}")
    if targets is None or old_logprobs is None:
        _fail("is_clip needs targets (the sampled ids) and old_logprobs (their rollout-time log-probs)")
    if is_level == "sequence" and len(lead) != 2:
        _fail(f"is_level='sequence' needs [batch, length] tokens, got leading shape {tuple(lead)}")
