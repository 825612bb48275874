"""How the model runs on this process: alone, replicated under DDP, or sharded by FSDP2.

Every computation sdft does with the weights (rollouts, teacher scoring, and the loss, which reads the
decoder and the LM-head weight directly for the fused op) runs as the forward of one module,
``Whole(model)``: ``Whole(model)(fn, *args)`` is ``fn(model, *args)``. That module is what DDP or
FSDP2 wraps, so the engine's hooks run around everything: DDP reduces the gradients in buckets
during the backward; FSDP2 all-gathers the root's parameters (embeddings, final norm, LM head) for
the whole computation and each block's around each block call, and reduce-scatters the gradients.

Both engines average gradients over processes; sdft divides each process's summed loss by the
divisor of the whole step (tokens or rollouts over all processes), so ``Runner.backward`` scales the
loss by the world size to get the gradient of the global loss.

Checkpoints hold full (unsharded) tensors, gathered from every process and written by process 0, so
a run resumes on any number of processes (``full_tensors`` / ``load_full``).
"""
from __future__ import annotations

import contextlib

import torch

from sdft.models import blocks_of
from sdft.runtime.distributed import World
from sdft.runtime.heap_trim import trim_freed_memory
from sdft.runtime.precision import autocast_dtype, loss_scaler


class Whole(torch.nn.Module):
    """A model whose forward runs any function of it, so a wrapper's hooks surround that function."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def shard(model, mixed_precision: str = "no") -> Whole:
    """FSDP2: each transformer block one unit, the rest (embeddings, norm, head) in the root.
    ``mixed_precision="bf16"`` (or ``"fp16"``): parameters gathered in that dtype for compute (the fused op
    then reads a bf16 head and accumulates in fp32), gradients reduced and kept in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if autocast_dtype(mixed_precision) is not None:
        policy = MixedPrecisionPolicy(param_dtype=autocast_dtype(mixed_precision), reduce_dtype=torch.float32)
    for block in blocks_of(model):
        fully_shard(block, mp_policy=policy)
    return fully_shard(Whole(model), mp_policy=policy)


def replicate(model):
    """DDP around ``Whole(model)``, without a buffer broadcast before every forward (a decoder's buffers,
    such as its rotary tables, never change in training), and with each gradient a view into DDP's
    all-reduce buckets (``gradient_as_bucket_view``): DDP keeps the buckets for the whole run, and separate
    gradients beside them would take as much memory again through every backward and optimizer step (4 bytes
    a trainable parameter in fp32: 28 GB for a 7B model). torch 2.13 renamed ``broadcast_buffers`` to
    ``forward_sync_buffers`` and warns on the old name; earlier versions know only the old one."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DistributedDataParallel(Whole(model), gradient_as_bucket_view=True,
                                   **{"forward_sync_buffers" if new else "broadcast_buffers": False})


class Runner:
    """Runs functions of the model on this process (``mode``: single, ddp or fsdp). ``trim``: give
    freed CPU heap memory back to the OS before each backward (``cpu_trim_memory``). ``scaler``: the
    loss scaler (``sdft.runtime.precision``; a pass-through except under fp16)."""

    def __init__(self, model, world: World = World(), mode: str = "ddp", mixed_precision: str = "no",
                 trim: bool = False):
        self.model, self.world, self.mixed_precision, self.trim = model, world, mixed_precision, trim
        self.mode = mode if world.active else "single"
        self.device_type = next(model.parameters()).device.type
        if self.mode == "fsdp":
            self.root = shard(model, mixed_precision)
        elif self.mode == "ddp":
            self.root = replicate(model)
        else:
            self.root = Whole(model)
        self.scaler = loss_scaler(mixed_precision, self.device_type, self.sharded)

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def _autocast(self):
        """bf16 (fp16) autocast around every computation with the weights (one process, DDP); FSDP2 casts
        the gathered parameters itself (``shard``). Master weights and optimizer state stay fp32."""
        dtype = autocast_dtype(self.mixed_precision)
        if dtype is None or self.sharded:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def __call__(self, fn, *args, **kwargs):
        """``fn(model, *args)`` with no gradient to reduce (rollouts, teacher scoring, evaluation):
        through the root under FSDP2 (parameters gathered), directly otherwise."""
        with torch.no_grad(), self._autocast():
            if not self.sharded:
                return fn(self.model, *args, **kwargs)
            try:
                return self.root(fn, *args, **kwargs)
            finally:  # FSDP2 keeps a root's parameters gathered after forward, expecting a backward
                self.root.reshard()

    def backward(self, fn, *args, divisor: float, sync: bool = True, **kwargs) -> torch.Tensor:
        """Run ``loss = fn(model, *args)`` and backpropagate ``loss / divisor``; across processes the
        gradients are summed when ``sync`` (the last micro-batch of a step), else accumulated locally.
        Under fp16 the gradients are the loss scale times that (``clip_and_step`` unscales them).
        Returns the detached loss."""
        scale = self.world.size / divisor if self.mode != "single" else 1.0 / divisor
        context = contextlib.nullcontext()
        if self.mode == "ddp" and not sync:
            context = self.root.no_sync()
        if self.sharded:
            self.root.set_requires_gradient_sync(sync)
        with context:
            with self._autocast():
                loss = self.root(fn, *args, **kwargs)
            if self.trim:  # what the rollouts and the forward freed, before the gradients arrive
                trim_freed_memory(loss.device)
            self.scaler.scale(loss * scale).backward()
        return loss.detach()

    def full_model(self):
        """The model with full weights for export: the model itself, or under FSDP2 a plain copy
        gathered from every process (all call this; process 0 gets the copy, the others None)."""
        if not self.sharded:
            return self.model
        state = full_tensors(self.model.state_dict(), keep=self.world.is_main)
        if not self.world.is_main:
            return None
        from transformers import AutoModelForCausalLM

        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        plain = AutoModelForCausalLM.from_config(self.model.config).to(dtype)
        plain.load_state_dict(state)
        return plain


def full_tensors(state: dict, keep: bool = True) -> dict | None:
    """``state`` (nested dicts/lists of tensors) with every DTensor gathered into a full tensor on the
    CPU; a collective under FSDP2: every process calls it, in the same order. ``keep`` False (a process
    that does not write): the gathers are taken part in, one tensor at a time, and nothing is kept, so
    the processes of a machine do not each hold the whole state in its memory; None is returned."""
    if isinstance(state, dict):
        out = {k: full_tensors(v, keep) for k, v in state.items()}
    elif isinstance(state, (list, tuple)):
        out = type(state)(full_tensors(v, keep) for v in state)
    elif _is_dtensor(state):
        full = state.full_tensor()
        out = full.cpu() if keep else None
    elif isinstance(state, torch.Tensor):
        out = state.detach().cpu() if keep else None
    else:
        out = state
    return out if keep else None


def _shard_like(value: torch.Tensor, target) -> torch.Tensor:
    """A full tensor as this process's shard of it, placed like the DTensor ``target``."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)


def load_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into ``target``: this process's shard of it when ``target`` is a DTensor."""
    with torch.no_grad():
        target.copy_(_shard_like(value, target) if _is_dtensor(target) else value)


def optimizer_state(optimizer, keep: bool = True) -> dict | None:
    """The optimizer's state dict with full tensors (gathered under FSDP2; ``keep``: as ``full_tensors``)."""
    return full_tensors(optimizer.state_dict(), keep)


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a full-tensor optimizer state: each parameter's moments are sharded like the parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(_is_dtensor(p) for p in params):
        for index, moments in state["state"].items():
            p = params[int(index)]
            for key, value in moments.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() > 0:
                    moments[key] = _shard_like(value, p)
    optimizer.load_state_dict(state)


def grad_norm_value(norm) -> float:
    """A gradient norm as a float (clip_grad_norm_ returns a DTensor under FSDP2)."""
    return float(norm.full_tensor() if _is_dtensor(norm) else norm)
