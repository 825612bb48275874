"""LM heads beyond ``h @ W.T``: a bias, a logit scale and a tanh soft cap, expressed exactly.

* ``logit_scale`` multiplies the logits before the temperature divides them: it folds into the
  temperature (T / scale), so every backend, the Triton kernels included, handles it unchanged.
* ``bias`` [V]: one more input column. ``[h, 1] @ [W, b].T = h @ W.T + b``, so the kernels see a
  plain head of width H + 1, and autograd splits the gradient of ``[W, b]`` back into dW and db.
  (Costs a copy of the head; models with a biased LM head are rare.)
* ``softcap`` (Gemma-2's final_logit_softcapping): ``cap * tanh(z / cap)`` after the scale, nonlinear
  (with a scale s: ``cap * tanh(s z / cap) = s * (cap / s) * tanh(z / (cap / s))``, so the scale still
  folds into the temperature), so it runs in the chunked path (``sdft_kernels.chunked``), which applies it
  to each logit block and chains ``1 - tanh^2`` into the gradient.
"""
from __future__ import annotations

import math

import torch


def effective_temperature(temperature: float, logit_scale: float) -> float:
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not (
            math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
    return float(temperature) / float(logit_scale)


def check_softcap(softcap) -> None:
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not (math.isfinite(softcap) and softcap > 0)):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")


def soft_cap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(z / cap)`` on raw logits (None: ``z`` unchanged)."""
    return z if cap is None else torch.tanh(z / cap) * cap


def _ones_column(h: torch.Tensor) -> torch.Tensor:
    return torch.cat([h, h.new_ones(h.shape[:-1] + (1,))], dim=-1)


def _check_bias(bias, weight, name):
    if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{name} must be a [{weight.shape[0]}] tensor (one per vocabulary entry), got {shape}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(f"{name} must have the head's dtype and device ({weight.dtype}, {weight.device}), "
                         f"got {bias.dtype} on {bias.device}")


def with_bias(student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias):
    """(hidden, teacher hidden, head, teacher head) with the biases as an extra input column."""
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("teacher_bias needs teacher_weight (a separate teacher head); a shared head shares "
                         "its bias")
    student_b = bias if bias is not None else weight.new_zeros(weight.shape[0])
    _check_bias(student_b, weight, "bias")
    if teacher_weight is None:
        teacher_b, teacher_w = student_b, weight
    else:
        teacher_b = teacher_bias if teacher_bias is not None else teacher_weight.new_zeros(teacher_weight.shape[0])
        _check_bias(teacher_b, teacher_weight, "teacher_bias")
        teacher_w = teacher_weight
    w_aug = torch.cat([weight, student_b[:, None]], dim=1)
    t_aug = w_aug if teacher_weight is None else torch.cat([teacher_w, teacher_b[:, None]], dim=1).detach()
    return (_ones_column(student_hidden), _ones_column(teacher_hidden.detach()), w_aug,
            None if teacher_weight is None else t_aug)
