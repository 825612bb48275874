"""Files sdft writes: which exceptions mean the disk refused a write, and one line saying why.

A full disk, a file-size limit, a read-only or forbidden folder reach sdft in three shapes: an
``OSError`` from Python's own file calls, a ``RuntimeError`` from ``torch.save`` ("PytorchStreamWriter
failed writing file") and safetensors' ``SafetensorError`` ("I/O error: No space left on device (os
error 28)"). Each writer catches ``WRITE_ERRORS``, removes what it half wrote, and raises ``WriteError``
(or ``CheckpointSaveError``) naming the file, the reason and what is still intact; the CLI prints it as its
one line. Tested for real under a file-size limit: ``tests/run/test_full_disk.py``.
"""
from __future__ import annotations

import errno
import os
import re
import shutil

from safetensors import SafetensorError

WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class WriteError(OSError):
    """A file or folder sdft writes could not be written; the message names it and what was kept."""


def write_reason(err: BaseException, where=None) -> str:
    """``err`` as a short reason: ``No space left on device (ENOSPC)`` where an errno is known; otherwise
    its first line and, with ``where`` (the folder written to), the free space there: torch.save reports a
    full disk only as a write that "stopped short" ("unexpected pos ...")."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(err))  # safetensors names the errno this way
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
