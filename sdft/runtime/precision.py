"""What ``mixed_precision`` means on this process: the dtype autocast computes in and, for fp16, the
loss scaler. Master weights and optimizer state stay in the weights' dtype (fp32) either way.

bf16 keeps fp32's exponent range and needs no scaling. fp16 keeps more significant bits (11 against 8)
but five exponent bits: gradients below 2^-24 flush to zero and values above 65504 overflow. So an
fp16 run scales its loss as the HF Trainer's ``fp16=True`` does (``torch.amp.GradScaler``'s defaults):
the loss is multiplied by the scale (2^16 at first) before the backward and the gradients divided by
it before clipping; a step whose gradients overflow is skipped and the scale halved, and after 2000
steps without an overflow it doubles. The scale is checkpointed, so a resumed run continues it.
"""
from __future__ import annotations

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_precision(setting: str, device: torch.device) -> str:
    """``mixed_precision`` resolved for ``device``: ``auto`` is bf16 on a CUDA device with bf16 support
    (what a GPU user of TRL or torchtune gets by default), fp32 ("no") elsewhere: fp16 is never chosen
    for a user, since a model trained in bf16 can overflow fp16's range in its activations."""
    if setting != "auto":
        return setting
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def native_16bit(precision: str) -> bool:
    """Whether this CPU multiplies ``precision``'s numbers in hardware (bf16: AVX512-BF16 or AMX; fp16:
    AMX-FP16); True when this torch cannot tell."""
    cpu = torch.cpu
    probes = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"), "fp16": ("_is_amx_fp16_supported",)}
    known = [getattr(cpu, name) for name in probes[precision] if hasattr(cpu, name)]
    return not known or any(probe() for probe in known)


def cpu_precision_note(setting: str, device: torch.device, dtype: str = "float32") -> str | None:
    """One line when 16-bit products asked for on the CPU (a 16-bit ``mixed_precision``, or weights in
    ``dtype=bfloat16``) have no hardware there: they are then emulated (on this project's AVX2 CPU a bf16
    step took 7x fp32's time, fp16 8x, weights in bf16 7x at 0.64x the memory:
    ``benchmarks/results/precision_cpu_avx2.md``, ``precision_dtype_cpu_avx2.md``)."""
    precision = compute_precision(setting, device)
    if device.type != "cpu":
        return None
    if precision in AUTOCAST_DTYPES and not native_16bit(precision):
        return (f"sdft: mixed_precision={precision} on a CPU without {precision} matrix instructions "
                f"({torch.backends.cpu.get_cpu_capability()}): its products are emulated, several times slower "
                "than fp32; mixed_precision=no is faster here (16-bit pays on GPUs and on CPUs with "
                f"{'AVX512-BF16 or AMX' if precision == 'bf16' else 'AMX-FP16'})")
    if dtype == "bfloat16" and not native_16bit("bf16"):
        return (f"sdft: dtype=bfloat16 on a CPU without bf16 matrix instructions "
                f"({torch.backends.cpu.get_cpu_capability()}): the weights take half the memory, but their "
                "products are emulated, several times slower than dtype=float32 (which is faster here wherever "
                "the model fits in fp32)")
    return None


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes in for a resolved precision (None: no autocast)."""
    return AUTOCAST_DTYPES.get(precision)


def loss_scaler(precision: str, device_type: str, sharded: bool) -> torch.amp.GradScaler:
    """The loss scaler of a run: enabled for fp16 only (disabled, every call is a pass-through). Under
    FSDP2 the sharded one, which agrees on an overflow across processes before any of them steps."""
    enabled = precision == "fp16"
    if sharded and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device_type)
    return torch.amp.GradScaler(device_type, enabled=enabled)


def scale_state(scaler) -> dict | None:
    """The scaler's state for a checkpoint (JSON: a float and four numbers), None when disabled."""
    return scaler.state_dict() if scaler is not None and scaler.is_enabled() else None


def restore_scale(scaler, state: dict | None) -> None:
    """Continue a checkpoint's loss scale (an fp16 run resumed as fp16; anything else starts afresh)."""
    if scaler is not None and scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def scale_record(scaler) -> dict:
    """A step record's ``loss_scale`` (the scale its backward ran at) under fp16; nothing otherwise."""
    return {"loss_scale": scaler.get_scale()} if scaler is not None and scaler.is_enabled() else {}


def check_tf32(on: bool, device: torch.device) -> None:
    """``tf32`` needs what it speeds up: a CUDA GPU of compute capability 8.0 (Ampere) or newer (HF's check)."""
    if not on:
        return
    if device.type != "cuda":
        raise ValueError(f"tf32=true speeds up fp32 matrix products on an Ampere or newer CUDA GPU; this run is on "
                         f"{device.type}: set tf32=false")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ValueError(f"tf32=true needs an Ampere or newer GPU (compute capability 8.0); this one is "
                         f"{major}.{minor}")


def tf32_matmuls(on: bool):
    """Allow TF32 in cuBLAS and cuDNN (when ``on``) for a run; returns a function that restores the old state."""
    if not on:
        return lambda: None
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def restore():
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    return restore
