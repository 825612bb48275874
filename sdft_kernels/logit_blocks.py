"""Row chunks of the LM-head logits, written into [chunk, V] buffers reused from chunk to chunk.

A fresh [chunk, V] tensor per chunk is slow on a CPU: glibc returns blocks this large to the
operating system when they are freed, so every chunk page-faults its logits in again (at the Qwen
shape, N=2048, the fused op spent a quarter of its time there: 21.4 s with fresh tensors, 16.6 s
with reused buffers, against 16.0 s for the four GEMMs alone). The buffers are as large as the
fresh tensors were, so peak memory does not change.
"""
from __future__ import annotations

import torch

# Bytes of one [chunk, V] float32 logit block (unless MIN_CHUNK_ROWS asks for more); three live at once.
CHUNK_BYTES = 32 * 1024 * 1024

# Fewest rows in a chunk: dW += gz.T @ h reads and writes all of dW ([V, H] fp32) once per chunk, so
# with few rows the update is memory-bound (Qwen's 0.9 GB dW at 55 rows a chunk made the CPU op 1.4x
# slower than TRL's). From about 256 rows on, the GEMM's arithmetic outweighs that traffic.
MIN_CHUNK_ROWS = 256


def alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised storage for a block (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def rows_per_chunk(vocab: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(vocab, 1)))


def row_chunks(n: int, vocab: int) -> list[slice]:
    """Row slices of ``rows_per_chunk(vocab)`` rows each."""
    step = rows_per_chunk(vocab)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


class LogitBlocks:
    """Student and teacher logits of one row chunk at a time, plus one scratch block.

    The blocks a call returns are overwritten by the next call: use (or copy) them first.
    """

    def __init__(self, n: int, vocab: int, dtype: torch.dtype, device):
        self.chunks = row_chunks(n, vocab)
        self._shape, self._dtype, self._device = (min(rows_per_chunk(vocab), max(n, 1)), vocab), dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def _block(self, name: str, count: int) -> torch.Tensor:
        """The first ``count`` rows of buffer ``name``, allocated on first use."""
        if name not in self._buffers:
            self._buffers[name] = alloc(self._shape, self._dtype, self._device)
        return self._buffers[name][:count]

    def logits(self, h_s, h_t, w, w_t, rows: slice, inv_temperature: float):
        """(student, teacher) logits of ``rows``, temperature applied; ``w``, ``w_t`` already in the
        blocks' dtype."""
        count = rows.stop - rows.start
        s, t = self._block("s", count), self._block("t", count)
        torch.mm(h_s[rows].to(s.dtype), w.T, out=s)
        torch.mm(h_t[rows].to(t.dtype), w_t.T, out=t)
        if inv_temperature != 1.0:
            s.mul_(inv_temperature)
            t.mul_(inv_temperature)
        return s, t

    def scratch(self, rows: slice) -> torch.Tensor:
        return self._block("scratch", rows.stop - rows.start)
