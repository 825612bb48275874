"""Decoding's small-batch linear layers on CPU: the faster of two exact GEMM layouts, by a fixed rule.

A decoding step multiplies a handful of rows (the still-running samples) by every weight of the
model. On CPU the BLAS behind ``F.linear`` (``x @ W.T``) has a cliff at some row counts: on the 2-core
Xeon of our benchmarks, 16-48 rows by a SmolLM2 MLP weight take 0.8-1.0 ms, while the same product
as ``(W @ x.T).T`` takes 0.3-0.4 ms (and the 49152-row LM head 28 ms against 14 ms at 16 rows), and
at 2-12 or >= 64 rows ``F.linear`` is the faster. Both are the same fp32 dot products summed in a
different order, so which one runs changes rounding only.

``small_batch_linears(model, policy)`` patches, for the duration of a ``with`` block, every CPU
``nn.Linear`` of the model so that fp32 inputs of a few rows may take ``W @ x.T``. Which layout runs
changes the rounding, so the choice must not depend on timing (a busy machine would then sample other
rollouts from the same seed). The policies:

- ``rule`` (default): ``W @ x.T`` for ``RULE_ROWS`` (8-48) rows, ``F.linear`` otherwise: the rows where
  it was faster on every SmolLM2 weight shape in ``benchmarks/results/decode_gemm_cpu.md``. A function
  of the row count alone, so a seed fixes the run on any machine and under any load.
- ``auto``: whichever layout is timed as faster per (weight shape, dtype, rows), once per process. Can
  be faster on another CPU, but two runs of one seed may differ when the machine is busy.
- ``off``: ``F.linear`` always.

Gradient mode, GPU and sharded (DTensor) weights keep ``F.linear``.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

MAX_ROWS = 64
RULE_ROWS = (8, 48)
POLICIES = ("rule", "auto", "off")
_REPEATS = 3
_choice: dict[tuple, bool] = {}  # (out, in, dtype, rows) -> True when W @ x.T is the faster


def _w_x(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mm(weight, x2.t()).t().contiguous()


def _seconds(fn) -> float:
    best = float("inf")
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _prefers_w_x(x2: torch.Tensor, weight: torch.Tensor, policy: str) -> bool:
    if policy == "rule":
        return weight.dtype == torch.float32 and RULE_ROWS[0] <= x2.shape[0] <= RULE_ROWS[1]
    key = (*weight.shape, weight.dtype, x2.shape[0])
    if key not in _choice:
        F.linear(x2, weight), _w_x(x2, weight)  # warm both paths
        _choice[key] = _seconds(lambda: _w_x(x2, weight)) < _seconds(lambda: F.linear(x2, weight))
    return _choice[key]


def _linear(module: torch.nn.Linear, x: torch.Tensor, policy: str) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    rows = x.numel() // max(x.shape[-1], 1)
    if torch.is_grad_enabled() or not 1 < rows <= MAX_ROWS or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if not _prefers_w_x(x2, weight, policy):
        return F.linear(x, weight, bias)
    y = _w_x(x2, weight)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _patchable(module) -> bool:
    if type(module) is not torch.nn.Linear:
        return False
    weight = module.weight
    return weight.device.type == "cpu" and type(weight.data) is torch.Tensor and weight.dim() == 2


@contextlib.contextmanager
def small_batch_linears(model: torch.nn.Module, policy: str = "rule"):
    """Within the block, the model's CPU linear layers take the layout ``policy`` picks for few rows."""
    if policy not in POLICIES:
        raise ValueError(f"decode_gemm must be one of {', '.join(POLICIES)}, got {policy!r}")
    patched = [(m, m.__dict__.get("forward")) for m in model.modules() if _patchable(m)] if policy != "off" else []
    for m, own in patched:
        if own is None:  # a forward set on the instance (a hook library's) is left alone
            m.forward = lambda x, _m=m: _linear(_m, x, policy)
    try:
        yield
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
