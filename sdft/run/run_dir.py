"""What a run finds in its output_dir before any model loads: start afresh, resume, or refuse; and
what it may delete there.

A run folder is owned: ``.sdft-run.json`` (the run record) lists every entry sdft wrote in it, and
sdft deletes or replaces only those entries and its own ``checkpoint-N`` folders, never a user's file
that happens to sit there (``output_dir=.`` in a project folder is safe); a ``checkpoint-N`` folder
without sdft's files (a transformers Trainer's) is refused, never resumed, rotated or cleared. A
rerun into a folder that holds checkpoints never silently starts over: it resumes when asked to, starts afresh when
``overwrite_output_dir`` says so, and otherwise refuses with a message naming both options. Resuming
from an older checkpoint moves the later ones (and the final model they led to) into a named
``abandoned-...`` folder, so rotation and ``resume_from_checkpoint=true`` never pick them up again.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from sdft.models.loading import SOURCE_UNKNOWN, is_adapter_folder, source_of
from sdft.run.checkpoint import (
    MANIFEST,
    OWN_FILES,
    CheckpointError,
    checkpoint_state,
    checkpoint_step,
    damage,
    folder_step,
    foreign_checkpoints,
    is_ours,
    list_checkpoints,
    newest_intact,
    plain_name,
    weights_only,
)
from sdft.run.lock import LOCK_FILE, RunLockedError, holder
from sdft.run.writes import WriteError, write_reason

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
EVAL_FILE = "eval.json"
FINAL_MODEL = "final_model"
BEST_FILE = "best_weights.pt"  # load_best_model_at_end's pick (sdft.run.best) and its record
BEST_RECORD = "best_weights.json"
RECORD_FILE = ".sdft-run.json"
ABANDONED = "abandoned-"


def report_line(message: str):
    """A progress or warning line on stderr (what the run directory and the trainer say)."""
    print(message, file=sys.stderr, flush=True)


def run_outputs(config, evaluating: bool | None = None) -> list[str]:
    """The entries (besides checkpoints) a run with ``config`` writes in its output_dir (``evaluating``:
    whether it evaluates held-out rows; default: whether ``config.eval_data`` names some)."""
    names = [CONFIG_FILE, METRICS_FILE]
    if bool(config.eval_data) if evaluating is None else evaluating:
        names.append(EVAL_FILE)
    if config.load_best_model_at_end:
        names += [BEST_FILE, BEST_RECORD]
    if "tensorboard" in config.report_to:
        names.append("runs")
    if "wandb" in config.report_to:
        names.append("wandb")
    if config.save_final_model:
        names.append(FINAL_MODEL)
    return names


def _recorded(out: Path) -> set[str] | None:
    """The names the run record lists, or None when the folder has no (readable) record."""
    try:
        names = json.loads((out / RECORD_FILE).read_text())["written"]
        return {n for n in names if plain_name(n)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _owned(out: Path, found: list[Path]) -> set[str]:
    """Entries of ``out`` sdft wrote: the record's; a folder of an older sdft (checkpoints, no record)
    owns the names a run writes there (``runs`` only when it holds nothing but TensorBoard events)."""
    recorded = _recorded(out)
    if recorded is not None:
        return recorded
    if not found:
        return set()
    runs = out / "runs"
    events = runs.is_dir() and all(p.name.startswith("events.out.tfevents") for p in runs.rglob("*") if p.is_file())
    return {CONFIG_FILE, METRICS_FILE, EVAL_FILE, FINAL_MODEL} | ({"runs"} if events else set())


def _foreign(out: Path, names: list[str], owned: set[str]) -> list[str]:
    return [n for n in names if (out / n).exists() and n not in owned]


class OutputDirInUse(ValueError):
    """A fresh run asked for in an output_dir that holds an earlier run's work (``held`` says what: ``output_dir
    OUT holds ...``); ``resumable``: whether a resume continues that run (its checkpoints hold the optimizer)."""

    def __init__(self, out: Path, held: str, resumable: bool):
        then = ("set resume_from_checkpoint=true to continue that run, overwrite_output_dir=true to start afresh, "
                if resumable else "set overwrite_output_dir=true to start afresh, ")
        super().__init__(f"output_dir {out} {held}, which this run would replace: {then}or choose a fresh output_dir")
        self.out, self.held, self.resumable = out, held, resumable


def run_entry_holding(path) -> str | None:
    """What of an sdft run ``path`` is or lies inside, as a phrase; None when nothing: an sdft checkpoint
    (its run rotates it away), or inside an entry a run's record lists (``final_model/``, ``runs/``, ...:
    its run replaces or deletes it). A run or an export written there would go with it."""
    path = Path(path).expanduser().resolve()
    for above in (path, *path.parents):
        if folder_step(above) >= 0 and above.is_dir() and is_ours(above):
            return f"{above}, an sdft checkpoint"
        if above != path and above.name in (_recorded(above.parent) or ()):
            return f"{above}, which the run in {above.parent} replaces or deletes"
    return None


def plan_run(config, report=report_line, evaluating: bool | None = None) -> Path | None:
    """Check ``config.output_dir`` (changing nothing); return the checkpoint to resume from, or None.
    ``evaluating``: as ``run_outputs``."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} exists and is not a folder")
    inside = run_entry_holding(out)
    if inside is not None:
        raise ValueError(f"output_dir {out} is or lies inside {inside}: choose a folder outside it")
    busy = holder(out)
    if busy is not None:
        raise RunLockedError(busy)
    strangers = foreign_checkpoints(out)
    if strangers:
        raise ValueError(f"output_dir {out} holds {strangers[0].name}, which is not an sdft checkpoint (it has none "
                         f"of {', '.join(OWN_FILES)}; another trainer's?) and which this run could overwrite or "
                         "rotate away: move it, or choose another output_dir")
    found = list_checkpoints(out)
    foreign = _foreign(out, run_outputs(config, evaluating), _owned(out, found))
    if foreign:
        raise ValueError(f"output_dir {out} holds {foreign[0]}, which no sdft run wrote there (it is not in "
                         f"{RECORD_FILE}) and which this run would write: move it, or choose another output_dir")
    if config.resume_from_checkpoint is False:
        if found and not config.overwrite_output_dir:
            if weights_only(found[-1]):  # its state.json alone: the refusal needs no checksums
                raise OutputDirInUse(out, f"holds checkpoints of the weights only (newest {found[-1].name}, "
                                          "save_only_model: nothing to resume)", resumable=False)
            raise OutputDirInUse(out, f"already holds checkpoints (newest {found[-1].name})", resumable=True)
        if (out / FINAL_MODEL).is_dir() and FINAL_MODEL in _owned(out, found) and not config.overwrite_output_dir:
            raise OutputDirInUse(out, f"holds {FINAL_MODEL}, the model of an earlier run whose checkpoints are gone "
                                      "(nothing to resume)", resumable=False)
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
            raise checkpoint_error(path, problem, "resume from")
    if weights_only(path):
        raise CheckpointError(f"{path} holds the weights only (save_only_model: no optimizer or RNG state), so no run "
                              f"resumes from it: `sdft export {path} DIR` writes its model, which a new run trains on "
                              "from (--model DIR, another output_dir)")
    return path


def checkpoint_error(path: Path, problem: str, use: str) -> CheckpointError:
    """The error for a folder given as a checkpoint to ``use`` ("export", "resume from") that is not a whole
    one (``problem``, as ``damage`` says): a run folder or a model folder is named as such, with what to pass."""
    if problem != "not found" and not (path / MANIFEST).exists():
        if (path / RECORD_FILE).is_file():
            intact = [c for c in list_checkpoints(path) if damage(c) is None]
            which = f"the newest is {intact[-1]}" if intact else "it holds none intact"
            final = (f"; its final model, {path / FINAL_MODEL}, is a model folder already"
                     if use == "export" and (path / FINAL_MODEL / "config.json").is_file() else "")
            return CheckpointError(f"{path} is an sdft run folder, not a checkpoint: {use} one of its "
                                   f"checkpoint-N folders ({which}){final}")
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            instead = ("it loads as it is (AutoModelForCausalLM.from_pretrained, or sdft generate)" if use == "export"
                       else "pass it as the model to train from it (--model, or train(model=...))")
            return CheckpointError(f"{path} is a model folder, not an sdft checkpoint: {instead}")
    return CheckpointError(f"{path} is not a complete sdft checkpoint: {problem}")


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clear(out: Path, report):
    """``overwrite_output_dir``: remove what sdft wrote in ``out`` (checkpoints, the record's entries)."""
    found = list_checkpoints(out)
    owned = _owned(out, found)
    for path in found:
        shutil.rmtree(path)
    for name in sorted(owned):
        if (out / name).exists() or (out / name).is_symlink():
            _remove(out / name)
    kept = sorted(p.name for p in out.iterdir() if p.name not in (RECORD_FILE, LOCK_FILE))
    if kept:
        report(f"sdft: overwrite_output_dir kept what sdft did not write in {out}: {', '.join(kept[:5])}"
               + (" ..." if len(kept) > 5 else ""))


def _abandon_later(out: Path, resume: Path, step: int, report) -> str | None:
    """Move the checkpoints after ``resume``'s step, and the final model, into a named branch folder."""
    later = [p for p in list_checkpoints(out) if folder_step(p) > step and p.resolve() != resume.resolve()]
    if not later:
        return None
    name = f"{ABANDONED}{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
    branch = out / name
    branch.mkdir()
    for path in later:
        os.replace(path, branch / f"checkpoint-{folder_step(path)}")
    for kept in (METRICS_FILE, EVAL_FILE):  # the abandoned run's whole history, before it is cut back
        if (out / kept).is_file():
            shutil.copy2(out / kept, branch / kept)
    if (out / FINAL_MODEL).is_dir():
        os.replace(out / FINAL_MODEL, branch / FINAL_MODEL)
    picked = best_record(out)
    if picked is not None and picked["step"] > step:  # load_best_model_at_end's pick came later: it goes too
        for name in (BEST_FILE, BEST_RECORD):
            if (out / name).is_file():
                os.replace(out / name, branch / name)
    report(f"sdft: resuming from step {step}: the later checkpoints "
           f"({', '.join(str(folder_step(p)) for p in later)}) of the run that went on from there moved to {branch}")
    return name


def best_record(out: Path) -> dict | None:
    """``load_best_model_at_end``'s record in ``out`` ({"step", "value", "metric"}), or None (none, unreadable)."""
    try:
        record = json.loads((Path(out) / BEST_RECORD).read_text())
        return {"step": int(record["step"]), "value": float(record["value"]), "metric": str(record["metric"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def replace_file(path: Path, text: str):
    """Write ``path`` through ``path.tmp`` and a rename: a reader (or a crash) sees the old or the new text."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path}: {write_reason(err)}") from None
    os.replace(tmp, path)


def _write_record(out: Path, names):
    replace_file(out / RECORD_FILE, json.dumps({"written_by": "sdft", "written": sorted(names)}, indent=1))


UNCOMPARED = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "progress_bar")


def changed_settings(before: dict, config) -> list[str]:
    """The settings this resumed run gives differently from ``before`` (the config of the run that wrote its
    checkpoint): ``name old -> new``."""
    now = config.to_dict()
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in now
            if k in before and k not in UNCOMPARED and before[k] != now[k]]


def _named(source) -> str:
    """A base model as a line names it: a Hub snapshot by its id and commit, not its path in the cache."""
    from sdft.models import hub

    if source is None:
        return "the embedded SmolLM2-135M-Instruct"
    fetched = hub.origin(source)
    return f"{fetched.repo_id} (commit {fetched.commit[:12]})" if fetched is not None else str(source)


def other_base(checkpoint: Path, source) -> str | None:
    """The base model ``checkpoint`` was trained from, named, where ``source`` (what is about to load, as
    ``sdft.models.loading.source_of`` gives it) is another one; else None. Its trainable weights (LoRA
    adapters, or the whole model) and the teacher's initial weights belong to that base. A model object
    of unknown origin, or a recorded folder that no longer exists (moved), is not compared."""
    return _other(checkpoint_state(checkpoint).get("model", SOURCE_UNKNOWN), source)


def _moved(recorded, source) -> bool:
    """Whether the base folder a checkpoint records is no longer where it was (and is not what loads now)."""
    return recorded not in (None, SOURCE_UNKNOWN, source) and not Path(recorded).exists()


def _other(recorded, source) -> str | None:
    """``other_base`` for the ``recorded`` base of a checkpoint's state."""
    if SOURCE_UNKNOWN in (source, recorded) or recorded == source or _moved(recorded, source):
        return None
    return _named(recorded)


def is_checkpoint_folder(model) -> bool:
    """Whether ``model`` (a path, or anything else) is an sdft checkpoint folder rather than a model folder."""
    if not isinstance(model, (str, Path)) or not Path(model).expanduser().is_dir():
        return False
    path = Path(model).expanduser()
    return is_ours(path) and not (path / "config.json").exists()  # a model folder has its config.json


def check_model_folder(model, adapter_ok: bool = False) -> None:
    """A model path that is an sdft checkpoint or run folder, not a model, is one line saying what to pass
    instead (transformers would read a run folder's config.json, which is sdft's, as the model's); so is a
    LoRA adapter folder unless ``adapter_ok`` (what answers with one: generate, teacher-check)."""
    if not isinstance(model, (str, Path)):
        return
    path = Path(model).expanduser()
    if not adapter_ok and is_adapter_folder(path):
        raise ValueError(f"{path} is a LoRA adapter, not a model folder: train from the merged model (`sdft export "
                         "CHECKPOINT OUT --merge` writes it from the run's checkpoint; peft's merge_and_unload from "
                         f"Python); `sdft generate {path}` answers with the adapter as it is")
    if is_checkpoint_folder(path):
        raise ValueError(f"{path} is an sdft checkpoint, not a model folder: `sdft export {path} OUT` writes one "
                         "from it")
    if (path / RECORD_FILE).is_file():
        raise ValueError(f"{path} is an sdft run folder, not a model folder: its model is {path / FINAL_MODEL} "
                         "(or export one of its checkpoints with `sdft export`)")


def check_model_outside_run(config, source, evaluating: bool | None = None) -> None:
    """The model a run loads (``source``, as ``sdft.models.loading.source_of`` gives it) must not lie in what
    the run writes, replaces or may clear in its output_dir (its final_model, a checkpoint, a set-aside
    branch, an entry sdft wrote there): the checkpoints name it as their base, and the run would replace
    it under them (a resume's teacher, an export's base would then be the trained model)."""
    if not isinstance(source, str) or source == SOURCE_UNKNOWN:
        return
    out = Path(config.output_dir).resolve()
    try:
        inside = Path(source).resolve().relative_to(out).parts
    except ValueError:
        return
    top = inside[0] if inside else ""
    ours = set(run_outputs(config, evaluating)) | _owned(out, list_checkpoints(out))
    if not inside or top in ours or folder_step(top) >= 0 or top.startswith(ABANDONED):
        where = f"{config.output_dir}'s {top}" if top else f"output_dir {config.output_dir} itself"
        raise ValueError(f"the model {source} is in {where}, which this run writes or may replace: copy it out "
                         f"of {config.output_dir} first, or choose another output_dir")


def resume_base(model, resume: Path | None):
    """The model a run loads: ``model``, but a Hub id whose checkpoint ``resume`` was trained from one of its
    snapshots resumes on that commit (fetched again where it is not), not on its branch's newest."""
    from sdft.models import hub

    if resume is None or not hub.is_repo_id(model):  # only then is the checkpoint's state read
        return model
    snapshot = hub.recorded_snapshot(model, checkpoint_state(resume).get("model"))
    return model if snapshot is None else str(hub.local(Path(snapshot)))


def check_resume_model(resume: Path, state: dict, source, report=report_line) -> None:
    """A resume continues the model its checkpoint (``resume``, whose ``state`` this is) was trained from:
    another base is one line; a base that is no longer where it was (moved) cannot be compared, and a note
    says which model stands in."""
    trained_from = _other(state.get("model", SOURCE_UNKNOWN), source)
    if trained_from is not None:
        raise ValueError(f"{resume} was trained from {trained_from}, but this run loads {_named(source)}: "
                         "resume with that model, or start afresh in another output_dir")
    if _moved(state.get("model"), source):
        report(f"sdft: {resume} was trained from {state['model']}, which is not there any more: resuming on "
               f"{_named(source)} as its base (the frozen teacher's weights, LoRA's base)")


LORA_SHAPE = ("lora_r", "lora_target_modules")  # with use_lora: the shapes of the adapters a checkpoint holds


def check_resume_weights(resume: Path, state: dict, config) -> None:
    """A resume keeps the settings that shape the trainable weights its checkpoint (``resume``, whose
    ``state`` this is) holds (full weights or LoRA adapters of a rank on some modules), and the optimizer whose
    state it holds: another value is one line before the model loads, never a shape error after it."""
    from sdft.runtime.optimizer import ADAMW

    before = state["config"]
    names = ["use_lora"] + (list(LORA_SHAPE) if config.use_lora and before.get("use_lora") else [])
    changed = [f"{n} {before[n]!r} -> {getattr(config, n)!r}" for n in names
               if n in before and before[n] != getattr(config, n)]
    optim = before.get("optim", ADAMW[1])  # a checkpoint from before the field: AdamW's state
    if optim != config.optim and not {optim, config.optim} <= set(ADAMW):  # its state is that optimizer's
        changed.append(f"optim {optim!r} -> {config.optim!r}")
    if changed:
        raise ValueError(f"{resume} holds weights these settings no longer fit ({', '.join(changed)}): resume "
                         "with the checkpoint's values, or start afresh (another output_dir, or "
                         "overwrite_output_dir=true)")


def check_run_model(config, resume: Path | None, model, evaluating: bool | None = None, report=report_line) -> None:
    """The model a run loads (None, a path or a model object), against its output_dir, before it loads:
    the weights and the base its resume checkpoint was trained with, and outside what the run replaces."""
    source = source_of(model)
    if resume is not None:
        state = checkpoint_state(resume)
        check_resume_weights(resume, state, config)
        check_resume_model(resume, state, source, report)
    check_model_outside_run(config, source, evaluating)


def start_run(config, resume: Path | None, report=report_line, evaluating: bool | None = None,
              data: dict | None = None, processes: int | None = None):
    """Make the output_dir ready: drop checkpoints a crash left half written, clear what sdft wrote for
    ``overwrite_output_dir``, set later checkpoints aside when resuming from an older one, record what
    this run writes, say where a resume starts and what it changes (settings, the training rows against
    ``data``, their ``data_fingerprint``, and the number of ``processes``)."""
    try:
        _start(Path(config.output_dir), config, resume, report, evaluating, data, processes)
    except OSError as err:
        raise ValueError(f"cannot write in output_dir {config.output_dir}: {err.strerror or err} "
                         f"({getattr(err, 'filename', None) or config.output_dir})") from None


def _start(out: Path, config, resume: Path | None, report, evaluating: bool | None, data: dict | None,
           processes: int | None):
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    for partial in (out / (BEST_FILE + ".tmp"), out / (BEST_RECORD + ".tmp")):  # a crash mid-write of the pick
        if partial.is_file():
            partial.unlink()
    if resume is None and config.overwrite_output_dir:
        _clear(out, report)
    names = _owned(out, list_checkpoints(out)) | set(run_outputs(config, evaluating))
    if resume is not None:
        step = checkpoint_step(resume)
        branch = _abandon_later(out, Path(resume), step, report)
        if branch is not None:
            names.add(branch)
        report(f"sdft: resuming from {resume} (step {step})")
        state = checkpoint_state(resume)
        changed = changed_settings(state["config"], config)
        if changed:
            report("sdft: resuming with changed settings: " + ", ".join(changed[:6])
                   + (f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""))
        before = state.get("data")
        if data is not None and before is not None and before != data:
            report(f"sdft: resuming on other training rows than {Path(resume).name} was trained on "
                   f"({before['rows']} rows then, {data['rows']} now): the steps from here draw from the new rows")
        then = state.get("processes")
        if processes is not None and then is not None and then != processes:
            per = config.per_device_train_batch_size * config.gradient_accumulation_steps
            report(f"sdft: resuming on {processes} processes, {Path(resume).name} was written by {then}: a step "
                   f"now takes {per * processes} prompts instead of {per * then}, in another order")
    _write_record(out, names)
    replace_file(out / CONFIG_FILE, config.to_json())
