"""Files sdft writes: which exceptions mean the disk refused a write, and one line saying why.

A full disk, a file-size limit, a read-only or forbidden folder reach sdft in four shapes: an
``OSError`` from Python's own file calls, a ``RuntimeError`` from ``torch.save`` ("PytorchStreamWriter
failed writing file"), safetensors' ``SafetensorError`` ("I/O error: No space left on device (os
error 28)") and tokenizers' bare ``Exception`` ("File too large (os error 27)"). Each writer catches
``WRITE_ERRORS`` (``refused_write`` where a tokenizer is saved), removes what it half wrote, and raises
``WriteError`` (or ``CheckpointSaveError``) naming the file, the reason and what is still intact; the CLI
prints it as its one line. Tested for real under a file-size limit: ``tests/run/test_full_disk.py``.
"""
from __future__ import annotations

import errno
import os
import re
import shutil

from safetensors import SafetensorError

WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_RUST_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust's io::Error ends: safetensors, tokenizers


def refused_write(err: BaseException) -> bool:
    """Whether ``err`` is a refused write: one of ``WRITE_ERRORS``, or a bare ``Exception`` of a Rust
    library naming an OS error (tokenizers' ``save`` raises ``Exception("File too large (os error 27)")``)."""
    return isinstance(err, WRITE_ERRORS) or (type(err) is Exception and bool(_RUST_OS_ERROR.search(str(err))))


class WriteError(OSError):
    """A file or folder sdft writes could not be written; the message names it and what was kept."""


def write_reason(err: BaseException, where=None) -> str:
    """``err`` as a short reason: ``No space left on device (ENOSPC)`` where an errno is known; otherwise
    its first line and, with ``where`` (the folder written to), the free space there: torch.save reports a
    full disk only as a write that "stopped short" ("unexpected pos ...")."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = _RUST_OS_ERROR.search(str(err))
        code = int(found.group(1)) if found else None
    if code is not None:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    free = _free_bytes(where) if where is not None else None
    return reason if free is None else f"{reason} ({free / 2**20:.0f} MiB free on that disk)"


def _free_bytes(where) -> int | None:
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None
