"""Run metrics: one JSON object per logged step in ``metrics.jsonl``, plus peak memory."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sdft.run.run_dir import replace_file
from sdft.run.writes import WriteError, write_reason


def logs_step(step: int, every: int, first: bool) -> bool:
    """Whether optimizer step ``step`` (from 1) is logged: every ``every`` steps, and the first when ``first``
    (HF's ``logging_steps`` / ``logging_first_step``)."""
    return step % every == 0 or (first and step == 1)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator on a GPU, resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MetricsLog:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict):
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a line cut short is left out by ``read``
            raise WriteError(f"could not write {self.path}: {write_reason(err)}") from None

    def read(self) -> list[dict]:
        """The records; a line cut short by a crash is left out."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate(self, step: int):
        """Keep only records of steps <= ``step`` (a resumed run then logs every step once)."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        replace_file(self.path, "".join(json.dumps(r) + "\n" for r in kept))
