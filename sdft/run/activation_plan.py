"""The activations a training step holds at its largest: what the student's scoring pass over one micro-batch
saves for its backward, beside the teacher's hidden states and the dense tree mask, for ``sdft train --dry-run``.

Counted, not modelled: the meta model (with the run's dtype, LoRA and gradient checkpointing) runs its forward
over a packed micro-batch of the longest prompts, each followed by ``num_generations`` distinct rollouts of
``max_completion_length`` tokens (a live teacher's contexts in the same tree where the run joins them), and
every tensor autograd saves is summed once (``saved_tensors_hooks``).
Attention saves what the memory-efficient kernels save (queries, keys and values, heads repeated as SDPA takes
them, the output and a log-sum-exp row), not a ``[heads x N x N]`` matrix; a model on eager attention runs
eager's products and keeps its probabilities. Under the dense tree mask SDPA also saves, in every layer, the
mask as an additive ``[rows, 1, width, width]`` tensor in the compute dtype: that quadratic part is added from
the packing, and it is what the block mask (FlexAttention, on CUDA) removes. Autocast is emulated on the meta
device (matrix products in bf16, each trainable weight cast once). On this CPU the count came within 5% of the
bytes the real pass saves in fp32, with LoRA, with gradient checkpointing and on eager attention, 10% over
(SmolLM2-135M) under bf16 autocast (``tests/run/test_activation_plan.py``). The backward's own transients (the
gradients of the layer it is in) are taken as one more layer's activations.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

COUNTING = "sdft_saved_for_backward"  # the attention implementation registered for the count


class _SavedByAttention(torch.autograd.Function):
    """Attention on the meta device that saves what a memory-efficient kernel saves (no values computed)."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # SDPA under a tree mask takes them repeated
    if getattr(module.config, "_sdft_counted_from", None) == "eager":  # eager's own products and probabilities
        scores = torch.matmul(query, key.transpose(2, 3))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), value)
    else:
        out = _SavedByAttention.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None


class _MetaAutocast(TorchFunctionMode):
    """Autocast for the meta device (autocast itself acts on CPU and CUDA tensors only): matrix products take
    their floating inputs in ``dtype``, a trainable weight cast once a pass (autocast's cache), the rest as is."""

    LOWER = (F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm)

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype, self.cache = dtype, {}

    def _cast(self, value):
        if not torch.is_tensor(value) or not value.is_floating_point() or value.dtype == self.dtype:
            return value
        if value.is_leaf and value.requires_grad:
            return self.cache.setdefault(id(value), value.to(self.dtype))
        return value.to(self.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOWER:
            args, kwargs = [self._cast(a) for a in args], {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(COUNTING, _attention)


def saved_bytes(model, rows: int, width: int) -> int:
    """Bytes autograd saves for the backward of ``model``'s decoder (on the meta device) over ``[rows, width]``
    tokens, each storage once, the parameters left out."""
    from sdft.models import decoder_of

    decoder = decoder_of(model)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = max(seen.get(storage._cdata, 0), storage.nbytes())
        return tensor

    ids = torch.zeros(rows, width, dtype=torch.long, device="meta")
    positions = torch.arange(width, device="meta").expand(rows, width)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    return sum(seen.values()) + hidden.numel() * hidden.element_size()  # the loss keeps the final states


@dataclass(frozen=True)
class ScoringActivations:
    """The scoring pass's activations at the step's largest micro-batch (``scoring_plan``)."""

    saved: int  # bytes the student's pass saves for its backward, its final states included
    teacher: int  # bytes of the teacher's final states, kept for the loss
    mask: int  # bytes of the dense tree mask and the additive copy SDPA saves in each layer (none: block mask)
    backward: int  # the backward's transients, taken as one layer's activations (its gradients as it runs)
    rows: int  # the student's pass: packed rows of ``width`` slots
    width: int
    checkpointed: bool

    @property
    def total(self) -> int:
        return self.saved + self.teacher + self.mask + self.backward

    def line(self) -> str:
        from sdft.run.memory_plan import size_text

        how = " (gradient_checkpointing: layer inputs and one layer's recompute)" if self.checkpointed else ""
        mask = f", {size_text(self.mask)} of it the dense tree mask's copies" if self.mask else ""
        return (f"scoring: the student's pass over that micro-batch ({self.rows} x {self.width} packed tokens) holds "
                f"about {size_text(self.total)} of activations for its backward{how}{mask}")


def _slots(prompts: list[list[int]], teacher_contexts: list[list[int]] | None, config, model,
           device: torch.device) -> tuple[int, int, str]:
    """(rows, width, mask) of the student's pass over the micro-batch of the longest ``prompts`` with distinct
    rollouts of full length: the prefix tree as the run packs it (``pack_choosing`` under ``flex_rule``: one
    tree under the block mask, rows by the dense mask's cost otherwise), the live teacher's contexts in the
    same tree where the run would join them (``share_teacher_prefix``, by ``joint_pass_pays``'s rule), or a
    padded row per rollout without prefix sharing. ``mask``: "block", "dense" or "none" (no tree)."""
    from sdft.prefix import attention as tree_attention
    from sdft.prefix.packed import joint_nodes_pay, pack_choosing, pack_sides

    batch, group, length = config.per_device_train_batch_size, config.num_generations, config.max_completion_length
    joint = config.share_teacher_prefix and config.teacher_mode == "live" and teacher_contexts is not None
    size = (lambda i: len(prompts[i]) + len(teacher_contexts[i])) if joint else (lambda i: len(prompts[i]))
    chosen = sorted(range(len(prompts)), key=size)[-batch:]
    longest = [prompts[i] for i in chosen]
    if not config.share_prefix or config.attn_implementation == "flash_attention_2":
        return len(longest) * group, max(map(len, longest)) + length - 1, "none"
    contexts = [torch.tensor(p) for p in longest]
    completions = torch.arange(len(longest) * group * length).reshape(-1, length) + 1  # distinct rollouts
    mask = torch.ones_like(completions, dtype=torch.bool)
    may, takes = tree_attention.flex_rule(config.tree_attention, model, device.type, training=True, grad=True)

    def pack(sides):
        return pack_choosing(lambda pairs: pack_sides(sides, completions, mask, 0, pairs), may, takes, model.config)

    sides = [contexts]
    if joint:
        teachers = [torch.tensor(teacher_contexts[i]) for i in chosen]
        if joint_nodes_pay(lambda sides: pack(sides)[0][0], contexts, teachers):
            sides = [contexts, teachers]
    (packed, _), flex = pack(sides)
    return packed.ids.shape[0], packed.width, "block" if flex else "dense"


def scoring_plan(meta_model, prompts: list[list[int]], config, device: torch.device,
                 teacher_contexts: list[list[int]] | None = None) -> ScoringActivations | None:
    """The activations of the student's scoring pass on ``device`` over the micro-batch of the longest ``prompts``
    (token ids; ``teacher_contexts``: each one's, for a pass that joins a live teacher), in the run's dtype and
    autocast, with the teacher's hidden states and (dense tree mask) the mask beside them; None where the meta
    model cannot run the count."""
    from sdft.models.lora import LoraSettings, apply_lora
    from sdft.models.parts import enable_checkpointing
    from sdft.run.memory_plan import compute_dtype
    from sdft.runtime.precision import autocast_dtype, compute_precision

    rows, width, tree_mask = _slots(prompts, teacher_contexts, config, meta_model, device)
    attention = meta_model.config._attn_implementation if config.attn_implementation == "auto" else \
        config.attn_implementation
    lower = autocast_dtype(compute_precision(config.mixed_precision, device))  # None: no autocast
    size = torch.empty((), dtype=compute_dtype(config, device)).element_size()
    layers = meta_model.config.get_text_config().num_hidden_layers

    def autocast():
        return _MetaAutocast(lower) if lower is not None else contextlib.nullcontext()

    _register()
    try:
        with torch.device("meta"):
            model = copy.deepcopy(meta_model).to(getattr(torch, config.dtype))  # the caller's stays as it is
            if config.use_lora:
                model = apply_lora(model, LoraSettings.from_config(config))
        model.config._sdft_counted_from = attention
        model.config._attn_implementation = COUNTING
        model.train()
        with autocast():
            total = saved_bytes(model, rows, width)  # autocast's weight casts among them
        layer = total // layers  # one layer's activations: the backward's transients, a checkpointed recompute
        if config.gradient_checkpointing:  # the layers' inputs, and one layer's activations as it recomputes
            enable_checkpointing(model)
            with autocast() as casting:
                total = saved_bytes(model, rows, width) + layer
            # autocast's cache holds every trainable weight's cast until the forward ends
            total += sum(t.nbytes for t in getattr(casting, "cache", {}).values())
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, KeyError):
        return None
    hidden = meta_model.config.get_text_config().hidden_size
    completions = min(len(prompts), config.per_device_train_batch_size) * config.num_generations
    teacher = completions * config.max_completion_length * hidden * size
    dense = tree_mask == "dense"
    copies = 1 if config.gradient_checkpointing or attention == "eager" else layers  # eager: one additive mask
    mask = rows * width * width * (1 + copies * size) if dense else 0
    return ScoringActivations(total, teacher, mask, layer, rows, width, config.gradient_checkpointing)
