"""The teacher: the same model conditioned on the demonstration, scored without gradients.

Modes: ``live`` uses the current weights; ``frozen`` the initial ones (for LoRA the base model with
adapters off, so no copy is made); ``ema`` an exponential moving average of the student.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import Counter

import torch

from sdft.models import decoder_of, eval_mode
from sdft.models.head import head_of
from sdft.prefix.packed import context_hidden
from sdft.runtime.parallel import Runner, full_tensors, load_full
from sdft.runtime.precision import autocast_dtype


def store_linears_in(model, dtype: torch.dtype | None) -> None:
    """Keep the weights (and biases) of ``model``'s linear layers in ``dtype``, the dtype autocast computes
    them in (None: no autocast, nothing changes). A frozen teacher scored under autocast then gives the same
    bits (autocast's cast, made once) from half the memory, and no pass re-casts them. Norms, embeddings
    and any weight shared with another module (a head tied to the embedding) stay as they are: they are not
    computed in ``dtype``."""
    if dtype is None:
        return
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and uses[id(module.weight)] == 1:
            for param in (module.weight, module.bias):
                if param is not None and param.dtype == torch.float32:  # autocast leaves float64 alone
                    param.data = param.data.to(dtype)


def store_parameters_in(model, dtype: torch.dtype | None) -> None:
    """Keep every floating-point parameter of ``model`` in ``dtype`` (None: nothing changes): what FSDP2's
    ``MixedPrecisionPolicy(param_dtype=dtype)`` gathers each of them in for compute, so a frozen teacher
    sharded under it gives the same bits from half the memory of its shards."""
    if dtype is None:
        return
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)


def store_frozen_copy(model, sharded: bool, dtype: torch.dtype | None) -> None:
    """Keep a frozen teacher copy in the dtype it computes in (None: no autocast, nothing changes): every
    parameter where FSDP2 gathers it in ``dtype`` (``sharded``), else its linear layers, which autocast
    computes in ``dtype``."""
    (store_parameters_in if sharded else store_linears_in)(model, dtype)


class Teacher:
    def __init__(self, student, mode: str = "live", ema_decay: float = 0.99):
        self.mode = mode
        self.ema_decay = ema_decay
        self.student = student
        self.lora = hasattr(student, "disable_adapter")
        self.copy = None
        self._runner = None  # the copy's runner when it is sharded (distribute)
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

    def distribute(self, runner) -> None:
        """Run a teacher copy like the student (``runner``: the student's ``sdft.runtime.parallel.Runner``):
        under FSDP2 the copy is sharded the same way, so each process holds 1/N of it and the EMA update
        works shard by shard; under DDP every process keeps a full replica (no gradients to reduce)."""
        if self.copy is None:
            return
        if self.mode == "frozen":
            store_frozen_copy(self.copy, runner.sharded, autocast_dtype(runner.mixed_precision))
        if runner.sharded:
            self._runner = Runner(self.copy, runner.world, "fsdp", runner.mixed_precision)

    @torch.no_grad()
    def score(self, contexts, completions, mask, pad_id: int, share_prefix: bool = True,
              passes: list | None = None, attention: str = "auto"):
        """(teacher hidden states [B*G, L, H] predicting each completion token, teacher head or None
        when it is the student's own). Under FSDP2 the copy's head is gathered for the fused op.
        ``attention``: the tree passes' mode (``sdft.prefix.attention``)."""
        def run(model):
            with eval_mode(model), self._context():
                hidden = context_hidden(decoder_of(model), contexts, completions, mask, pad_id, passes,
                                        share_prefix, attention)
            if self.copy is None:
                return hidden, None
            head = head_of(model)
            if self._runner is not None:  # the gathered head lives only inside this forward: keep a copy
                head = dataclasses.replace(head, weight=head.weight.detach().clone(),
                                           bias=None if head.bias is None else head.bias.detach().clone())
            return hidden, head

        if self._runner is not None:
            return self._runner(run)
        return run(self._model())

    @torch.no_grad()
    def update(self):
        """After an optimizer step: move the EMA copy toward the student."""
        if self.mode != "ema":
            return
        for (_, t), (_, s) in zip(self.copy.named_parameters(), self.student.named_parameters()):
            if s.requires_grad:
                t.lerp_(s.detach(), 1.0 - self.ema_decay)

    def state_dict(self, keep: bool = True):
        """The EMA weights as full tensors (gathered from every process under FSDP2: all call it; ``keep``
        False: a process that does not write takes part and gets None)."""
        if self.mode != "ema":
            return None
        names = {n for n, p in self.student.named_parameters() if p.requires_grad}
        return full_tensors({n: p for n, p in self.copy.named_parameters() if n in names}, keep)

    def load_state_dict(self, state):
        if self.mode != "ema" or state is None:
            return
        params = dict(self.copy.named_parameters())
        for name, value in state.items():
            load_full(params[name], value)
