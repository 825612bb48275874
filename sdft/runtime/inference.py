"""Where ``sdft generate`` and ``sdft teacher-check`` run a model, and in which dtype.

As a training run's ``device=auto``: a CUDA GPU where there is one, else the CPU. ``dtype=auto`` is bfloat16
on a GPU that has it (what a GPU user's inference runs in: half fp32's memory, the tensor-core rate) and
float32 elsewhere, so answers on a CPU stay what they were; float16 is never chosen for a user, since a
model trained in bf16 can overflow its range.
"""
from __future__ import annotations

import re

import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def run_device(name: str) -> torch.device:
    """The ``device`` setting as a device: ``auto`` is CUDA where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(name: str, field: str = "device") -> torch.device:
    """``name`` (auto, cpu, cuda, cuda:N) as a device of this machine (``run_device``); one line where it is
    not one."""
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"{field} must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = run_device(name)
    if device.type == "cuda" and name != "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{field}={name} but no CUDA device is available; use {field}=cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{field}={name} but this machine has {count} CUDA device"
                             f"{'' if count == 1 else 's'} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    return device


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """``name`` (one of ``DTYPES``) as a dtype on ``device``; ``auto`` as the module says."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
