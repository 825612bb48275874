"""Keep freed memory in the process during CPU training (glibc): no page faults on every step.

PyTorch allocates CPU tensors with plain ``malloc``. glibc serves large blocks with a fresh ``mmap``
and unmaps them on ``free``, so every activation, logit block and gradient of every step is
page-faulted in again, 4 KiB at a time (the kernel's time shows as system time). Turning off
``mmap`` for large blocks and raising the trim threshold keeps freed blocks in the heap, where the
next step's tensors of the same sizes reuse them.

Process-wide and kept for the rest of the process (like any allocator setting); Linux with glibc
only, a no-op elsewhere. ``SDFTConfig.cpu_keep_freed_memory`` turns it off.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt's int takes

_applied: bool | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc took them."""
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = bool(libc is not None
                        and libc.mallopt(M_MMAP_MAX, 0) == 1
                        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    return _applied
