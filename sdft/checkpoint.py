"""Checkpoints that survive a crash: written to a temporary folder, then renamed into place.

A checkpoint holds the trainable parameters, the optimizer, the EMA teacher (if any), the random
number generator states (so a resumed run samples the same rollouts as an uninterrupted one) and the
step; a folder named ``checkpoint-N`` is therefore always complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, step: int, model, optimizer, teacher, config, keep: int) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(trainable_state(model), tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    teacher_state = teacher.state_dict() if teacher is not None else None
    if teacher_state is not None:
        torch.save(teacher_state, tmp / "teacher.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": config.to_dict()}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    out = Path(output_dir)
    if not out.exists():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path, model, optimizer, teacher) -> int:
    """Restore a checkpoint into model, optimizer and teacher (None: no teacher); returns its step."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete sdft checkpoint (no state.json)")
    state = torch.load(path / "trainable.pt", map_location="cpu")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    if teacher is not None and (path / "teacher.pt").exists():
        teacher.load_state_dict(torch.load(path / "teacher.pt", map_location="cpu"))
    if (path / "rng.pt").exists():
        set_rng_state(torch.load(path / "rng.pt"))
    return int(json.loads((path / "state.json").read_text())["step"])
