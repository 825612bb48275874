"""TRL's own ``SDFTTrainer`` with its logits-materialising loss replaced by sdft's fused op.

    from sdft.integrations.trl_loss import FusedSDFTTrainer   # a subclass of trl's SDFTTrainer
    trainer = FusedSDFTTrainer(model=..., args=trl_sdft_config, train_dataset=..., processing_class=...)

Everything else stays TRL's: rollouts (vLLM included), teacher construction and sync, accelerate /
DeepSpeed / FSDP handling, logging. Only ``compute_loss`` changes: the student and the teacher run
their usual forward through the (possibly wrapped) model, so DDP/FSDP hooks fire, but keep one logit
column instead of ``[B, T, V]`` (``logits_to_keep=1``); their final hidden states go to
``fused_linear_divergence`` with TRL's objective (``distillation_mode`` full_logits / topk_logits /
sampled_token, ``distillation_alpha``, ``distillation_add_tail``, ``distillation_is_clip`` on reused
rollouts, ``num_loss_tokens_to_skip``, temperature, the per-sequence mean then batch mean) and the
model's LM head as ``sdft.models.head`` describes it. The teacher-server path is TRL's, unchanged.
Requires ``trl`` (``pip install "sdft[trl]"``).
"""
from __future__ import annotations

import torch
from trl.experimental.sdft import SDFTTrainer as _TRLSDFTTrainer

from sdft.loss.spec import LossSpec
from sdft.models import decoder_of
from sdft.models.head import check_logits, head_of
from sdft.runtime.heap_trim import trim_freed_memory


def completion_hidden(model, input_ids, attention_mask, width: int) -> torch.Tensor:
    """Final (normed) hidden states [B, width, H] predicting the last ``width`` tokens, from the
    model's own forward (hooks of DDP/FSDP wrappers run), keeping one logit column only. The decoder's
    output is caught by a forward hook (``output_hidden_states`` would keep every layer's states
    alive, which under gradient checkpointing costs more than the logits saved on long prompts)."""
    caught = {}
    decoder = decoder_of(getattr(model, "module", model))

    def catch(module, args, output):
        caught["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(catch)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return caught["hidden"][:, -(width + 1):-1]


@torch.no_grad()
def check_hidden_route(model) -> None:
    """The decoder's output through the head must give the model's logits (post-norm states)."""
    unwrapped = getattr(model, "module", model)
    head = head_of(unwrapped)
    ids = (torch.arange(6, device=head.weight.device) * 7919 % head.weight.shape[0])[None]
    hidden = completion_hidden(unwrapped, ids, torch.ones_like(ids), 5)[0]
    logits = unwrapped(input_ids=ids).logits[0, :-1]
    check_logits(head, hidden, logits, f"{type(unwrapped).__name__}: its decoder's output through the LM head does "
                 "not give the model's logits", "FusedSDFTTrainer cannot fuse its loss.")


class FusedSDFTTrainer(_TRLSDFTTrainer):
    """``trl.experimental.sdft.SDFTTrainer`` whose loss never materialises [tokens x vocab] logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_spec = LossSpec.from_trl(self.args, self.temperature)  # refuses a mode sdft does not fuse
        check_hidden_route(self.accelerator.unwrap_model(self.model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDFTTrainer does not support returning outputs")
        if self.use_teacher_server:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        width = completion_ids.size(1)
        s_hidden = completion_hidden(model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
                                     torch.cat([inputs["prompt_mask"], completion_mask], 1), width)
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            t_hidden = completion_hidden(self.teacher_model, inputs["teacher_input_ids"],
                                         inputs["teacher_attention_mask"], width)
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        head = head_of(student)
        t_head = None if teacher is student else head_of(teacher)
        if t_head is not None and t_head.weight is head.weight:
            t_head = None
        # TRL's bf16=True is autocast: the fused op then computes in its bf16 (sdft.loss.spec.compute_dtype)
        total = self.loss_spec.summed(s_hidden, t_hidden, head, t_head, completion_mask, completion_ids,
                                      inputs.get("old_per_token_logps"))
        loss = total / completion_ids.size(0)  # TRL: mean over each sequence's tokens, then over sequences
        mode = "train" if model.training else "eval"
        self._log_self_distillation_metric(mode, self.accelerator.gather(loss.detach()).mean().item())
        accumulation_scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        trim_freed_memory(loss.device)  # CPU: the freed forward activations, before TRL runs the backward
        return loss / accumulation_scale
