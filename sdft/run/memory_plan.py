"""What a run keeps in memory on each process from its first step to its last, before activations: the
weights, their gradients (under DDP, views into its all-reduce buckets: no second copy), the optimizer's
state and a teacher copy. Counted on the meta device from the model's config, through the run's own LoRA,
teacher-copy and optimizer functions (the optimizer takes one step there, which creates its state), so the
numbers are those of the tensors the run will hold (nothing is allocated); ``sdft train --dry-run`` prints
them beside the device's memory, before a GPU is rented for a run that cannot fit.

Beside it, the largest transient: the rollouts' KV cache for the micro-batch of the longest prompts
(``rollout_cache``), whose bytes per token come from a one-token pass of the meta model, so every
architecture's own cache (grouped-query heads, sliding windows) is counted as it is built.

After the rollouts, the scoring pass's activations (``sdft.run.activation_plan``), counted the same way.

bitsandbytes' optimizers cannot step on the meta device: their state comes from their layout.

Not counted: FSDP2's gathered block, the CUDA context, and the state of another optimizer that cannot step on
the meta device (named as not counted)."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from sdft.loss.teacher import store_frozen_copy
from sdft.models.attention import FLASH
from sdft.models.lora import LoraSettings, apply_lora
from sdft.models.parts import kv_cache
from sdft.runtime.optimizer import OptimizerSettings, make_optimizer
from sdft.runtime.precision import autocast_dtype, compute_precision

GIB = 2**30


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def size_text(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class TrainingState:
    """Bytes held on one process through training, by part (in the order printed); ``uncounted``: a part
    that exists but is not counted (another optimizer's state), named."""

    parts: tuple[tuple[str, int], ...]
    uncounted: str = ""  # e.g. "optim=adamw_8bit's state"

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def line(self, available: tuple[str, int] | None = None) -> str:
        """One line of the plan; ``available``: (the device's name, its memory in bytes) to compare against."""
        parts = " + ".join(f"{name} {size_text(n)}" for name, n in self.parts if n)
        text = f"memory per process before activations: {size_text(self.total)} ({parts}"
        text += f"; {self.uncounted} not counted)" if self.uncounted else ")"
        if available is not None:
            text += f" of {available[0]}'s {size_text(available[1])}"
        return text

    def warning(self, available: tuple[str, int] | None, config, cache: int = 0, activations: int = 0) -> str | None:
        """One line when the state alone, or with the step's largest transient (the rollouts' KV cache,
        ``cache`` bytes, or the scoring pass's ``activations``: one is freed before the other is made), does not
        fit ``available``, naming the switches that shrink what is over."""
        if available is None or self.total + max(cache, activations) <= available[1]:
            return None
        if self.total <= available[1]:
            what, it = ("the rollouts' KV cache", "the cache") if cache >= activations else (
                "the scoring pass's activations", "them")
            also = "; so does gradient_checkpointing=true" if it == "them" and not config.gradient_checkpointing else ""
            return (f"sdft: the run would not fit: its training state ({size_text(self.total)}) and {what} "
                    f"({size_text(max(cache, activations))}) take more than {available[0]}'s "
                    f"{size_text(available[1])}; a smaller per_device_train_batch_size, num_generations or "
                    f"max_completion_length shrinks {it} (gradient_accumulation_steps keeps the step's prompts){also}")
        fixes = [s for s, off in (("use_lora=true", not config.use_lora),
                                  ("dtype=bfloat16", config.dtype == "float32"),
                                  ("parallel=fsdp over several processes", config.parallel != "fsdp"),
                                  ("teacher_mode=live (no teacher copy)",
                                   any(name.endswith("teacher copy") for name, _ in self.parts))) if off]
        return (f"sdft: the run would not fit: its weights, gradients and optimizer state take "
                f"{size_text(self.total)} before activations, more than {available[0]}'s {size_text(available[1])}"
                + (f"; {', '.join(fixes)} shrink them" if fixes else ""))


def training_state(meta_model, config, processes: int, device: torch.device) -> TrainingState:
    """The state ``config`` trains ``meta_model`` (a model on the meta device, as loaded before ``dtype``)
    with, on each of ``processes`` processes on ``device``."""
    precision = compute_precision(config.mixed_precision, device)
    sharded = config.parallel == "fsdp" and processes > 1
    share = processes if sharded else 1  # FSDP2: every process holds 1/N of each
    with torch.device("meta"):
        model = copy.deepcopy(meta_model).to(getattr(torch, config.dtype))  # the caller's stays as it is
        if config.use_lora:
            model = apply_lora(model, LoraSettings.from_config(config))
        teacher = None
        if config.teacher_mode == "ema" or (config.teacher_mode == "frozen" and not config.use_lora):
            teacher = copy.deepcopy(model)
            if config.teacher_mode == "frozen":
                store_frozen_copy(teacher, sharded, autocast_dtype(precision))
    trainable = _bytes(p for p in model.parameters() if p.requires_grad)
    parts = [("weights", _bytes(model.parameters()) // share), ("gradients", trainable // share)]
    optimizer = optimizer_state(model, OptimizerSettings.from_config(config))
    if optimizer is not None:
        parts.append((f"{optimizer[0]} state", optimizer[1] // share))
    if teacher is not None:
        parts.append((f"{config.teacher_mode} teacher copy", _bytes(teacher.parameters()) // share))
    return TrainingState(tuple(parts), "" if optimizer is not None else f"optim={config.optim}'s state")


# bitsandbytes' optimizers by their HF Trainer names: (states a value, bits a state), for ``bitsandbytes_state``
BITSANDBYTES = {
    **dict.fromkeys(("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"), (2, 8)),
    **dict.fromkeys(("paged_adamw_32bit", "paged_adamw"), (2, 32)),
    **dict.fromkeys(("lion_8bit", "paged_lion_8bit", "rmsprop_bnb_8bit"), (1, 8)),
    **dict.fromkeys(("lion_32bit", "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_32bit"), (1, 32)),
}
BNB_MIN_8BIT = 4096  # bitsandbytes keeps a smaller tensor's state in 32 bits
BNB_BLOCK = 2048  # values per block of a blockwise 8-bit state, each block with one float32 absmax


def bitsandbytes_state(name: str, params) -> int | None:
    """Bytes of the state bitsandbytes' optimizer ``name`` keeps for ``params``, from its layout (its kernels do
    not run on the meta device): per state, 4 bytes a value for 32-bit states and tensors under 4096 values, else
    one byte a value and a float32 absmax per block of 2048. None for a name not in ``BITSANDBYTES``."""
    if name not in BITSANDBYTES:
        return None
    states, bits = BITSANDBYTES[name]
    total = 0
    for p in params:
        n = p.numel()
        total += states * (4 * n if bits == 32 or n < BNB_MIN_8BIT else n + 4 * -(-n // BNB_BLOCK))
    return total


def optimizer_state(meta_model, settings: OptimizerSettings) -> tuple[str, int] | None:
    """(the optimizer's class name, the bytes of its state) once the run's optimizer has taken one step over
    ``meta_model``'s trainable parameters on the meta device (state appears at the first step); bitsandbytes'
    (whose kernels need a GPU) from its layout (``bitsandbytes_state``); None for another optimizer that cannot
    step there."""
    params = [p for p in meta_model.parameters() if p.requires_grad]
    layout = bitsandbytes_state(settings.name, params)
    if layout is not None:
        return f"{settings.name} (bitsandbytes)", layout
    try:
        with torch.device("meta"):
            for p in params:
                p.grad = torch.empty_like(p)
            optimizer = make_optimizer(meta_model, settings)
            optimizer.step()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    finally:
        for p in params:
            p.grad = None
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return type(optimizer).__name__, _bytes(state)


def cache_per_token(meta_model, dtype: torch.dtype) -> int | None:
    """Bytes one token adds to ``meta_model``'s KV cache in ``dtype``, read off the cache a one-token pass on
    the meta device builds (None where the pass or its cache cannot be read there)."""
    try:
        with torch.no_grad():
            model = copy.deepcopy(meta_model).to(dtype)  # the caller's stays as it is
            out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device="meta"), use_cache=True, logits_to_keep=1)
        layers = kv_cache(out).layers
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
        return None
    return _bytes(t for layer in layers for t in vars(layer).values() if torch.is_tensor(t))


def rollout_cache(per_token: int, prompts: list[list[int]], config, model_config) -> int:
    """Bytes of the KV cache the rollouts of one micro-batch of the longest ``prompts`` (token ids) hold
    (``per_token``: what a token adds, ``cache_per_token``): their rows as the engine packs them under the
    dense mask (``sdft.rollout.engine.pack_prompts``; FlexAttention's packing on CUDA may share a long
    prefix more) with room for every rollout; a flash-attention model copies its prompt's cache to each
    rollout (``model_config``: the model's)."""
    from sdft.prefix.tree import pairs_per_token
    from sdft.rollout.engine import cache_positions, pack_prompts

    batch, group, steps = config.per_device_train_batch_size, config.num_generations, config.max_completion_length
    longest = sorted(prompts, key=len)[-batch:]
    if config.attn_implementation in FLASH:
        return per_token * len(longest) * group * (max(map(len, longest)) + steps)
    packed = pack_prompts(longest, 0, pairs_per_token(model_config), model_config, group, steps)  # any pad id
    return per_token * cache_positions(packed, group, steps)


@dataclass(frozen=True)
class RolloutCache:
    """The KV cache the rollouts of a micro-batch of the longest prompts reserve (``rollout_plan``)."""

    total: int  # bytes
    per_token: int  # bytes a token adds
    dtype: torch.dtype  # what the rollouts compute (and cache) in

    def line(self, config) -> str:
        return (f"rollouts: a micro-batch of the {config.per_device_train_batch_size} longest prompts x "
                f"{config.num_generations} rollouts of up to {config.max_completion_length} tokens reserves a KV "
                f"cache of {size_text(self.total)} ({self.per_token} bytes a token in {str(self.dtype)[6:]})")


def compute_dtype(config, device: torch.device) -> torch.dtype:
    """What a run computes (and caches, and saves for its backward) in on ``device``: autocast's, else the
    weights'."""
    return autocast_dtype(compute_precision(config.mixed_precision, device)) or getattr(torch, config.dtype)


def rollout_plan(meta_model, prompts: list[list[int]], config, device: torch.device) -> RolloutCache | None:
    """The rollouts' KV cache for ``prompts`` (token ids) on ``device``, in the dtype they compute in there
    (``compute_dtype``); None where the meta model's cache cannot be read."""
    dtype = compute_dtype(config, device)
    per_token = cache_per_token(meta_model, dtype)
    if per_token is None:
        return None
    return RolloutCache(rollout_cache(per_token, prompts, config, meta_model.config), per_token, dtype)


def device_memory(device: torch.device) -> tuple[str, int] | None:
    """(name, bytes) of the memory a run on ``device`` has: a CUDA device's, or this machine's RAM for the CPU
    (None where it cannot be read)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}", torch.cuda.get_device_properties(index).total_memory
    try:
        return "this machine", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None
