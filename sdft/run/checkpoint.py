"""Checkpoints that survive a crash and reveal damage.

A checkpoint folder ``checkpoint-N`` holds the trainable weights (``trainable.safetensors``), the EMA
teacher if any (``teacher.safetensors``), the optimizer and RNG states (``optimizer.pt``, ``rng.pt``,
read back with ``weights_only=True`` so opening a checkpoint cannot run code), ``state.json`` (step,
config) and, written last, ``manifest.json`` with the size and SHA-256 of every other file. It is
written to a temporary folder, flushed to disk (fsync) and renamed into place, and older checkpoints are
deleted only after that, so a crash or power loss while saving leaves no partial ``checkpoint-N`` and
the previous one intact; the manifest catches files damaged afterwards (truncated copy, full disk).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdft.run.writes import WRITE_ERRORS, write_reason
from sdft.runtime.optimizer import regroup
from sdft.runtime.parallel import full_tensors, load_full, load_optimizer_state, optimizer_state
from sdft.runtime.precision import restore_scale, scale_state

PATTERN = re.compile(r"^checkpoint-(\d+)$")
ASIDE = re.compile(r"^\.checkpoint-(\d+)\.old$")
MANIFEST = "manifest.json"
OWN_FILES = (MANIFEST, "state.json", "trainable.safetensors")  # any one marks a checkpoint-N folder as sdft's


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or damaged."""


class CheckpointSaveError(CheckpointError):
    """Saving a checkpoint failed (full disk, read-only or forbidden folder); the older ones are intact."""


def trainable_state(model, keep: bool = True) -> dict | None:
    """The trainable tensors, full (gathered from every process under FSDP2: all call this; ``keep`` False:
    a process that does not write takes part and gets None)."""
    state = full_tensors({n: p for n, p in model.named_parameters() if p.requires_grad}, keep)
    return None if state is None else {n: t.contiguous() for n, t in state.items()}


def rng_state() -> dict:
    """The CPU generator's state and this process's CUDA device's (never every device's: a run resumes on
    a machine with fewer GPUs, where another device's index does not exist)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    """Restore ``rng_state``'s; the CUDA state (a list per device, as checkpoints before this wrote it: the
    current device's entry, where it has one) only where CUDA is here."""
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path):
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def _fsync(path: Path):
    """Flush a file or a folder entry to disk, so a rename after it never points at unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path):
    for p in folder.iterdir():
        if p.is_file():
            _fsync(p)
    _fsync(folder)


def _aside(out: Path, step: int) -> Path:
    """Where ``checkpoint-N`` waits while the same step is saved again (a resumed run)."""
    return out / f".checkpoint-{step}.old"


REQUIRED = ("trainable.safetensors", "state.json")  # every checkpoint's; a resumable one's also RESUME_FILES
RESUME_FILES = ("optimizer.pt", "rng.pt")  # absent from a save_only_model checkpoint (state.json: weights_only)


def plain_name(name) -> bool:
    """A file name inside the folder itself: no separator, no ``..``, not absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def damage(path) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else what is wrong with it. The manifest
    admits only plain names of regular files inside the folder (a crafted ``../x``, an absolute name, a
    link or a FIFO is refused before anything is read), and must list every file a resume reads."""
    path = Path(path)
    if not path.is_dir():
        return "not found"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (an incomplete or foreign folder)"
    for name in REQUIRED:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, want in files.items():
        if not plain_name(name):
            return f"{MANIFEST} names {name!r}, which is not a plain file name inside the checkpoint"
        f = path / name
        try:
            info = f.lstat()
        except OSError:
            return f"{name} is missing"
        if not stat.S_ISREG(info.st_mode):
            return f"{name} is not a regular file"
        if not isinstance(want, dict) or info.st_size != want.get("bytes"):
            return (
                f"{name} has {info.st_size} bytes, {want.get('bytes') if isinstance(want, dict) else '?'} were written"
            )
        if _sha256(f) != want.get("sha256"):
            return f"{name} does not match its checksum"
    try:
        state = checkpoint_state(path)
    except CheckpointError as err:
        return str(err)
    for name in () if state.get("weights_only") else RESUME_FILES:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    return None


def weights_only(path) -> bool:
    """Whether a checkpoint says it holds the weights alone (``save_only_model``): exported, never resumed.
    False when its state.json does not read (``damage`` names that, when a resume or an export reads it)."""
    try:
        return bool(checkpoint_state(path).get("weights_only"))
    except CheckpointError:
        return False


def resume_note(path) -> str:
    """What a stopped or failed run says of its newest checkpoint ``path``: how to continue from it."""
    if weights_only(path):
        return ("it holds the weights only (save_only_model): `sdft export` writes a model of it, no run resumes "
                "from it")
    return "resume_from_checkpoint=true continues from it"


def folder_step(path) -> int:
    """The step in a checkpoint folder's name (``checkpoint-N`` or ``.checkpoint-N.old``)."""
    name = Path(path).name
    m = PATTERN.match(name) or ASIDE.match(name)
    return int(m.group(1)) if m else -1


def save_checkpoint(output_dir, step: int, model, optimizer, teacher, config, keep: int,
                    model_source: str | None = None, write: bool = True, data: dict | None = None,
                    processes: int = 1, scaler=None, only_model: bool = False) -> Path | None:
    """Write ``checkpoint-{step}`` atomically; ``model_source`` (the base model's path, or None for the
    embedded one) lets ``sdft export`` rebuild the full model from the checkpoint alone; ``data`` (the
    training rows' ``data_fingerprint``) lets a resume say when it trains on other rows. Tensors are
    stored full, so any number of processes can resume from it (``processes``, the number that wrote it, lets
    the resume say when that changes the step's size; ``scaler``, an fp16 run's loss scale, is continued
    by the resume; ``only_model``: the weights without the optimizer and RNG states, HF's save_only_model);
    under FSDP2 every process calls this (the gathers are collective) and only the one with ``write`` writes."""
    trainable = trainable_state(model, keep=write)
    optimizer_full = None if only_model else optimizer_state(optimizer, keep=write)
    teacher_state = teacher.state_dict(keep=write) if teacher is not None and not only_model else None
    if not write:
        return None
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if not only_model:
            torch.save(optimizer_full, tmp / "optimizer.pt")
            torch.save(rng_state(), tmp / "rng.pt")
        if teacher_state is not None:
            save_file(teacher_state, str(tmp / "teacher.safetensors"))
        state = {"step": step, "config": config.to_dict(), "model": model_source, "data": data,
                 "processes": processes, "loss_scale": scale_state(scaler), "weights_only": only_model}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        _write_manifest(tmp)
        _fsync_folder(tmp)
    except WRITE_ERRORS as err:  # a full disk, a file-size limit, a read-only or forbidden folder
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(out)
        kept = (f"the previous checkpoint {previous[-1].name} is intact ({resume_note(previous[-1])})"
                if previous else "no earlier checkpoint exists")
        raise CheckpointSaveError(f"could not write checkpoint-{step} in {out}: {write_reason(err, out)}; "
                                  f"{kept}") from None
    aside = _aside(out, step)
    if final.is_dir() and not is_ours(final):  # appeared during the run (the start refuses one): never replaced
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(f"could not write checkpoint-{step} in {out}: a {final.name} that no sdft run "
                                  "wrote is in the way; move it and resume")
    if final.exists():  # the same step saved again (a resumed run): keep the old copy until the new is in
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(out)
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_ours(folder: Path) -> bool:
    """Whether a ``checkpoint-N`` folder is sdft's: it holds one of ``OWN_FILES`` (a damaged one still does)."""
    return any((folder / name).exists() for name in OWN_FILES)


def _checkpoint_folders(out: Path) -> tuple[dict, dict, list[Path]]:
    """``checkpoint-N`` folders of ``out`` by step: sdft's, the ones a crash left moved aside, and the
    ones no sdft run wrote (a transformers Trainer's, say: none of ``OWN_FILES``)."""
    found, aside, foreign = {}, {}, []
    if not out.is_dir():
        return found, aside, foreign
    for p in out.iterdir():
        if p.is_dir() and (m := PATTERN.match(p.name)):
            if is_ours(p):
                found[int(m.group(1))] = p
            else:
                foreign.append(p)
        elif p.is_dir() and (m := ASIDE.match(p.name)):
            aside[int(m.group(1))] = p
    return found, aside, sorted(foreign, key=folder_step)


def list_checkpoints(output_dir) -> list[Path]:
    """sdft's checkpoint folders (intact or not), oldest first. A ``checkpoint-N`` that a crash left moved
    aside (between the two renames of saving step N again) stands in for the missing ``checkpoint-N``.
    A ``checkpoint-N`` without any of sdft's files is not one of them (``foreign_checkpoints``)."""
    found, aside, _ = _checkpoint_folders(Path(output_dir))
    return [p for _, p in sorted({**aside, **found}.items())]


def foreign_checkpoints(output_dir) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir`` that no sdft run wrote: never resumed, rotated or removed."""
    return _checkpoint_folders(Path(output_dir))[2]


def newest_intact(output_dir, report=print) -> Path | None:
    """The newest checkpoint that passes its manifest; each damaged newer one is reported and skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = damage(path)
        if problem is None:
            return path
        report(f"sdft: skipping damaged checkpoint {path}: {problem}")
    return None


def checkpoint_state(path) -> dict:
    """``state.json`` of a checkpoint: its step, config and model source (one-line error if unreadable)."""
    where = Path(path) / "state.json"
    try:
        state = json.loads(where.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{where} is unreadable ({err})") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("config"), dict)):
        raise CheckpointError(f"{where} lacks its step or config: not written by sdft")
    return state


def checkpoint_step(path) -> int:
    return int(checkpoint_state(path)["step"])


def load_trainable(path, model):
    """Copy a verified checkpoint's trainable weights into ``model`` (same trainable parameter names)."""
    path = Path(path)
    problem = damage(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete sdft checkpoint: {problem}")
    copy_trainable(load_file(str(path / "trainable.safetensors")), model, f"checkpoint {path}")


def copy_trainable(state: dict, model, source: str) -> None:
    """Copy ``state`` (full tensors by name, as ``trainable_state`` gives them) into ``model``'s trainable
    parameters; ``source`` names where it came from when the names do not match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    for name, value in state.items():
        load_full(params[name], value)


def load_checkpoint(path, model, optimizer, teacher, scaler=None) -> int:
    """Restore a verified checkpoint into model, optimizer, teacher (None: no teacher) and an fp16 run's
    loss scaler; returns its step."""
    path = Path(path)
    load_trainable(path, model)
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    load_optimizer_state(optimizer, regroup(state, optimizer))
    if teacher is not None and (path / "teacher.safetensors").exists():
        teacher.load_state_dict(load_file(str(path / "teacher.safetensors")))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    state = checkpoint_state(path)
    restore_scale(scaler, state.get("loss_scale"))
    return int(state["step"])
