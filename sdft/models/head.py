"""The LM head of a causal LM as the fused op computes it, checked against the model's own logits.

Families differ after ``h @ W.T``: a bias (some heads are ``nn.Linear`` with bias), a logit scale
(Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides) or a tanh soft cap
(Gemma-2/3's ``final_logit_softcapping``). ``head_of`` reads them from the model; ``verify_head``
runs the model once on a few tokens and compares its logits with ours, so a family whose head does
something else is refused with a clear error instead of being trained on a silently different loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sdft.models import base_model, decoder_of, eval_mode, output_layer
from sdft.models.attention import attention_as


@dataclass
class Head:
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Logits of ``hidden`` [..., H] computed in ``dtype`` (for checks; training never
        materialises them)."""
        z = torch.nn.functional.linear(hidden.to(dtype), self.weight.to(dtype),
                                       None if self.bias is None else self.bias.to(dtype))
        z = z * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


def _text_config(config):
    return getattr(config, "text_config", None) or config


def head_of(model) -> Head:
    """The student's (or a teacher copy's) head: weight, bias, scale and cap from the model and its config."""
    base = base_model(model)
    linear = output_layer(model)
    if hasattr(linear, "base_layer") and hasattr(linear, "lora_A"):  # peft's LoRA wrapper of the head
        raise ValueError("lora_target_modules adapts the LM head: sdft fuses the head into the loss as a plain "
                         "weight, so adapters go on the layers below it; leave it out of lora_target_modules "
                         "(peft's all-linear does)")
    if not isinstance(linear, torch.nn.Linear):
        raise ValueError(f"{type(base).__name__}: its output layer is a {type(linear).__name__}, not a linear "
                         "LM head; sdft cannot fuse it")
    config = _text_config(base.config)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale = scale / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return Head(linear.weight, linear.bias, scale, float(softcap) if softcap else None)


@torch.no_grad()
def verify_head(model, head: Head | None = None, tokens: int = 8) -> Head:
    """``head`` (default ``head_of(model)``) after checking it reproduces the model's logits."""
    head = head or head_of(model)
    base = base_model(model)
    device = head.weight.device
    vocab = head.weight.shape[0]
    ids = (torch.arange(tokens, device=device) * 7919 % vocab)[None]
    # flash-attn refuses fp32 weights outside autocast (a bf16 mixed-precision run keeps them fp32), and the
    # head does not depend on the attention: sdpa here
    flash = "flash" in str(base.config._attn_implementation)
    with eval_mode(model), attention_as(base, "sdpa") if flash else contextlib.nullcontext():
        logits = model(input_ids=ids).logits[0].double()
        hidden = decoder_of(model)(input_ids=ids).last_hidden_state[0]
    check_logits(head, hidden, logits, f"{type(base).__name__}: its logits are not what sdft computes from the "
                 f"final hidden states (h @ W.T + bias, times logit_scale={head.logit_scale}, soft cap "
                 f"{head.softcap})", "Training it would optimise a different loss, so it is refused.")
    return head


def check_logits(head: Head, hidden: torch.Tensor, logits: torch.Tensor, problem: str, consequence: str) -> None:
    """Raise ``problem (max difference ...). consequence`` unless ``head`` applied to ``hidden`` gives
    ``logits``. Ours repeats the model's operations in its own dtype, so only kernel-level rounding
    may differ: 16 ulps of that dtype at the largest logit."""
    ours = head.logits(hidden, head.weight.dtype).double()
    error = (ours - logits.double()).abs().max().item()
    bound = 16 * torch.finfo(head.weight.dtype).eps * max(logits.abs().max().item(), 1e-30)
    if not error <= bound:
        raise ValueError(f"{problem}; max difference {error:.3g}. {consequence}")
