"""The teacher: the same model conditioned on the demonstration, scored without gradients.

Modes: ``live`` uses the current weights; ``frozen`` the initial ones (for LoRA the base model with
adapters off, so no copy is made); ``ema`` an exponential moving average of the student.
"""
from __future__ import annotations

import contextlib
import copy

import torch


from .batch_prefix import batched_unshared_hidden, shared_prefix_hidden
from .lm_head import head_of
from .model_parts import decoder_of, eval_mode


class Teacher:
    def __init__(self, student, mode: str = "live", ema_decay: float = 0.99):
        self.mode = mode
        self.ema_decay = ema_decay
        self.student = student
        self.lora = hasattr(student, "disable_adapter")
        self.copy = None
        if mode == "ema" or (mode == "frozen" and not self.lora):
            self.copy = copy.deepcopy(student).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    def is_student(self, config) -> bool:
        """Whether the teacher computes with exactly the student's weights and modules (``live``, no
        frozen-adapter switch, no active dropout): then it can share the student's forward pass."""
        if self.mode != "live" or self.copy is not None:
            return False
        dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.student.modules())
        return not dropout and not getattr(config, "attention_dropout", 0.0)

    def _model(self):
        return self.copy if self.copy is not None else self.student

    def _context(self):
        if self.mode == "frozen" and self.lora:
            return self.student.disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def hidden(self, contexts, completions, mask, pad_id: int, share_prefix: bool = True,
               passes: list | None = None) -> torch.Tensor:
        """Teacher hidden states [B*G, L, H] predicting each completion token (``batch_prefix``)."""
        fn = shared_prefix_hidden if share_prefix else batched_unshared_hidden
        model = self._model()
        with eval_mode(model), self._context():
            return fn(decoder_of(model), contexts, completions, mask, pad_id, passes)

    def head(self):
        """The teacher's LM head (``sdft.lm_head.Head``), or None when it is the student's own (the
        fused op then reads it once)."""
        if self.copy is None:
            return None
        return head_of(self.copy)

    @torch.no_grad()
    def update(self):
        """After an optimizer step: move the EMA copy toward the student."""
        if self.mode != "ema":
            return
        for (_, t), (_, s) in zip(self.copy.named_parameters(), self.student.named_parameters()):
            if s.requires_grad:
                t.lerp_(s.detach(), 1.0 - self.ema_decay)

    def state_dict(self):
        if self.mode != "ema":
            return None
        names = {n for n, p in self.student.named_parameters() if p.requires_grad}
        return {n: p.detach().clone() for n, p in self.copy.named_parameters() if n in names}

    def load_state_dict(self, state):
        if self.mode != "ema" or state is None:
            return
        params = dict(self.copy.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
