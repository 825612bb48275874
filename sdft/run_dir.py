"""What a run finds in its output_dir before any model loads: start afresh, resume, or refuse.

A rerun into a folder that holds checkpoints never silently starts over (which would rotate the old
checkpoints away and append duplicate steps to metrics.jsonl): it resumes when asked to, starts afresh
when ``overwrite_output_dir`` says so, and otherwise refuses with a message naming both options.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .checkpoint import CheckpointError, checkpoint_step, damage, list_checkpoints, newest_intact

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def _report(message: str):
    print(message, file=sys.stderr, flush=True)


def plan_run(config, report=_report) -> Path | None:
    """Check ``config.output_dir`` (changing nothing); return the checkpoint to resume from, or None."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} exists and is not a folder")
    found = list_checkpoints(out)
    if config.resume_from_checkpoint is False:
        if found and not config.overwrite_output_dir:
            raise ValueError(f"output_dir {out} already holds checkpoints (newest {found[-1].name}): set "
                             "resume_from_checkpoint=true to continue that run, overwrite_output_dir=true to "
                             "start afresh, or choose a fresh output_dir")
        return None
    if config.resume_from_checkpoint is True:
        path = newest_intact(out, report)
        if path is None:
            extra = f" ({len(found)} damaged)" if found else ""
            raise CheckpointError(f"resume_from_checkpoint=true but {out} holds no intact checkpoint{extra}; "
                                  "drop resume_from_checkpoint to start afresh")
    else:
        path = Path(config.resume_from_checkpoint)
        problem = damage(path)
        if problem is not None:
            raise CheckpointError(f"{path} is not a complete sdft checkpoint: {problem}")
    return path


def start_run(config, resume: Path | None, report=_report):
    """Make the output_dir ready: drop checkpoints a crash left half written, clear it for
    ``overwrite_output_dir``, say where a resume starts."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    if resume is None and config.overwrite_output_dir:
        for path in list_checkpoints(out):
            shutil.rmtree(path)
        (out / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / "runs", ignore_errors=True)  # TensorBoard events of the old run
    if resume is not None:
        report(f"sdft: resuming from {resume} (step {checkpoint_step(resume)})")
    (out / CONFIG_FILE).write_text(config.to_json())
