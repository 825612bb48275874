"""What a run keeps in memory on each process from its first step to its last, before activations: the
weights, their gradients (under DDP, views into its all-reduce buckets: no second copy), the optimizer's
state and a teacher copy. Counted on the meta device from the model's config, through the run's own LoRA,
teacher-copy and optimizer functions (the optimizer takes one step there, which creates its state), so the
numbers are those of the tensors the run will hold (nothing is allocated); ``sdft train --dry-run`` prints
them beside the device's memory, before a GPU is rented for a run that cannot fit.

Not counted: activations (the rollouts' KV cache, the scoring passes and their backward, which
``gradient_checkpointing`` and smaller ``per_device_train_batch_size`` x ``num_generations`` x
``max_completion_length`` cut), FSDP2's gathered block, the CUDA context, and the state of an optimizer
that cannot step on the meta device (bitsandbytes': named as not counted)."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from sdft.loss.teacher import store_frozen_copy
from sdft.models.lora import LoraSettings, apply_lora
from sdft.runtime.optimizer import OptimizerSettings, make_optimizer
from sdft.runtime.precision import autocast_dtype, compute_precision

GIB = 2**30


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _size(n: float) -> str:
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
        parts = " + ".join(f"{name} {_size(n)}" for name, n in self.parts if n)
        text = f"memory per process before activations: {_size(self.total)} ({parts}"
        text += f"; {self.uncounted} not counted)" if self.uncounted else ")"
        if available is not None:
            text += f" of {available[0]}'s {_size(available[1])}"
        return text

    def warning(self, available: tuple[str, int] | None, config) -> str | None:
        """One line when the state alone does not fit ``available``, naming the switches that shrink it."""
        if available is None or self.total <= available[1]:
            return None
        fixes = [s for s, off in (("use_lora=true", not config.use_lora),
                                  ("dtype=bfloat16", config.dtype == "float32"),
                                  ("parallel=fsdp over several processes", config.parallel != "fsdp"),
                                  ("teacher_mode=live (no teacher copy)",
                                   any(name.endswith("teacher copy") for name, _ in self.parts))) if off]
        return (f"sdft: the run would not fit: its weights, gradients and optimizer state take {_size(self.total)} "
                f"before activations, more than {available[0]}'s {_size(available[1])}"
                + (f"; {', '.join(fixes)} shrink them" if fixes else ""))


def training_state(meta_model, config, processes: int, device: torch.device) -> TrainingState:
    """The state ``config`` trains ``meta_model`` (a model on the meta device, as loaded before ``dtype``)
    with, on each of ``processes`` processes on ``device``."""
    precision = compute_precision(config.mixed_precision, device)
    sharded = config.parallel == "fsdp" and processes > 1
    share = processes if sharded else 1  # FSDP2: every process holds 1/N of each
    with torch.device("meta"):
        model = meta_model.to(getattr(torch, config.dtype))
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


def optimizer_state(meta_model, settings: OptimizerSettings) -> tuple[str, int] | None:
    """(the optimizer's class name, the bytes of its state) once the run's optimizer has taken one step over
    ``meta_model``'s trainable parameters on the meta device (state appears at the first step); None for an
    optimizer that cannot step there (bitsandbytes' kernels need a GPU)."""
    params = [p for p in meta_model.parameters() if p.requires_grad]
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
