"""Writing a model as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

Works for models loaded from GGUF too (transformers refuses ``save_pretrained`` on those: the weights
are copied into a fresh model built from the same config first). ``config.architectures`` is set so
peers such as TRL, vLLM or ``pipeline`` can build the model from the path alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from sdft.data.chat import template_kwargs_of, with_template_kwargs
from sdft.models.loading import EXPORT_MARK  # a later export may replace a folder that holds it
from sdft.run.writes import WriteError, refused_write, write_reason

REPLACED = ".replaced-"  # a forced export keeps the folder it displaced as OUT.replaced-DATE
_HF_FILE = re.compile(r"^(config\.json|generation_config\.json|.+\.safetensors|.+\.safetensors\.index\.json|"
                      r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|"
                      r"chat_template\.(jinja|json)|adapter_config\.json|adapter_model\.(safetensors|bin)|"
                      r"README\.md|" + re.escape(EXPORT_MARK) + r")$")


def _not_ours(out: Path) -> str | None:
    """The first entry that makes ``out`` more than an earlier sdft export (None: missing, empty, or
    marked with ``EXPORT_MARK`` and holding nothing but model files). A model folder without the
    mark is someone's model (a downloaded base, another tool's save), not ours to replace."""
    entries = list(out.iterdir()) if out.is_dir() else []
    if not entries:
        return None
    foreign = [p.name for p in entries if not (p.is_file() and _HF_FILE.match(p.name))]
    if foreign:
        return f"it holds {foreign[0]}"
    return None if (out / EXPORT_MARK).is_file() else f"no {EXPORT_MARK}: it is not an sdft export"


def _run_part(out: Path) -> str | None:
    """What of an sdft run ``out`` is or lies inside (its output_dir, a checkpoint, inside an entry its run
    replaces), None when nothing: forced exports never displace these, nor are they written where a run
    would later replace or delete them."""
    from sdft.run.run_dir import RECORD_FILE, run_entry_holding

    if (out / RECORD_FILE).is_file():
        return "an sdft run's output_dir"
    inside = run_entry_holding(out)
    return None if inside is None else f"or lies inside {inside}"


def _check_apart(checkpoint: Path, out: Path, base) -> None:
    """The export is written beside the checkpoint it reads, never over it, into it or around it, and
    never in place of the base model it builds on (``base``: its path, None for the embedded one): a forced
    export there would become the base the checkpoint's weights are read onto."""
    src, dst = checkpoint.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        where = "is" if dst == src else "holds" if dst in src.parents else "is inside"
        raise ValueError(f"export target {out} {where} the checkpoint {checkpoint}: choose a folder outside it")
    from sdft.models.loading import SOURCE_UNKNOWN

    if base not in (None, SOURCE_UNKNOWN):
        model = Path(base).expanduser().resolve()
        if dst == model or dst in model.parents:
            raise ValueError(f"export target {out} {'is' if dst == model else 'holds'} the base model {base} that "
                             f"{checkpoint}'s weights build on (even --force would put the export in its place, "
                             "and the checkpoint would read it as its base): choose another folder")


def _check_final_model(checkpoint: Path, out: Path) -> None:
    """An export into a run's ``final_model/`` writes the run's newest checkpoint there (the command a run
    prints when its final write failed), never an older one over the model the run ended with."""
    from sdft.run.checkpoint import newest_intact
    from sdft.run.run_dir import FINAL_MODEL, RECORD_FILE

    run = out.parent
    if out.name != FINAL_MODEL or not (run / RECORD_FILE).is_file() or not out.is_dir() or not any(out.iterdir()):
        return
    newest = newest_intact(run, report=lambda message: None)
    if newest is None or newest.resolve() != checkpoint.resolve():
        raise ValueError(f"export target {out} is the model the run in {run} ended with; {checkpoint} is not that "
                         f"run's newest checkpoint ({newest}), so the export would replace the run's result with "
                         "other weights: choose another folder")


def check_target(out, force: bool = False) -> bool:
    """Refuse (one line) to write over a folder that is not an earlier export: the user's files are
    never wiped. ``force`` writes there anyway, the old folder moved aside, not deleted. True when the
    folder there must be kept (forced over something not ours)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export target {out} exists and is not a folder")
    run_part = _run_part(out)
    if run_part is not None:
        raise ValueError(f"export target {out} is {run_part} (--force does not move it aside): choose another "
                         "folder, e.g. a new one beside the checkpoints")
    problem = _not_ours(out)
    if problem is not None and not force:
        raise ValueError(f"export target {out} is not empty and not an earlier sdft export ({problem}): choose an "
                         f"empty or new folder, or pass --force (force=True) to write there, the folder moved "
                         f"aside to {out.name}{REPLACED}DATE")
    return problem is not None


@contextlib.contextmanager
def _no_shard_bar():
    """transformers' "Writing model shards" bar off while saving (it printed even with progress_bar=false)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _write_folder(out: Path, model, tokenizer, force: bool = False, **save_options) -> Path:
    """Save into a temporary sibling and swap it in by renames: a crash never leaves a half-written
    export under the final name, and the previous export stays whole until the new one is in. A forced
    write over a folder that is not an earlier export keeps that folder as ``OUT.replaced-DATE``."""
    keep = check_target(out, force)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    old = out.with_name(out.name + (f"{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}" if keep else f".old{os.getpid()}"))
    while keep and old.exists():  # a second forced export within the same second
        old = old.with_name(old.name + "-1")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _no_shard_bar():
            model.save_pretrained(tmp, **save_options)
        _hub_base(tmp)
        tokenizer.save_pretrained(tmp)
        kwargs = template_kwargs_of(tokenizer)  # how the run rendered its chats: generate and teacher-check do too
        (tmp / EXPORT_MARK).write_text(json.dumps({"written_by": "sdft", **({"chat_template_kwargs": kwargs}
                                                                           if kwargs else {})}))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if refused_write(err):
            kept = f"{out} is as it was" if out.exists() else "nothing was left there"
            raise WriteError(f"could not write {out}: {write_reason(err, out.parent)}; {kept}") from None
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if keep:
        print(f"sdft: {out} was not an sdft export: the folder that was there is now {old}", file=sys.stderr,
              flush=True)
    else:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _hub_base(folder: Path) -> None:
    """An adapter of a Hub model names its base by its Hub id and the commit it was trained on (peft's
    ``revision``), as peft's own do (a snapshot's path in one machine's cache means nothing on another); rewritten
    after peft's save, which reads the base's config.json at that path."""
    from sdft.models import hub

    path = folder / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    fetched = hub.origin(config.get("base_model_name_or_path") or "")
    if fetched is not None:
        config["base_model_name_or_path"], config["revision"] = fetched.repo_id, fetched.commit
        path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def save_hf_folder(model, tokenizer, out, force: bool = False) -> Path:
    """Save ``model`` (safetensors + config + generation config) and ``tokenizer`` to ``out`` atomically."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    check_target(out, force)
    config = model.config
    config.architectures = [type(model).__name__]
    if getattr(config, "quantization_config", None) is not None or getattr(model, "is_quantized", False):
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(model.state_dict())
        model = fresh
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return _write_folder(out, model, tokenizer, force, safe_serialization=True)


def export_model(model, tokenizer, out, merge_lora: bool = False, force: bool = False) -> Path:
    """A loadable folder from a trained model. LoRA: the peft adapter (``PeftModel.from_pretrained``
    over the base model), or with ``merge_lora`` the merged full model; otherwise the full model.
    A non-empty ``out`` that is not an earlier export is refused unless ``force``."""
    out = Path(out)
    if not hasattr(model, "peft_config"):
        if merge_lora:
            print(f"sdft: merge (--merge, merge_lora): the model has no LoRA adapters to merge (a full fine-tune); "
                  f"{out} holds the full model as it is", file=sys.stderr, flush=True)
        return save_hf_folder(model, tokenizer, out, force)
    if merge_lora:
        import copy

        return save_hf_folder(copy.deepcopy(model).merge_and_unload(), tokenizer, out, force)
    _name_base(model)
    return _write_folder(out, model, tokenizer, force)


def _name_base(model) -> None:
    """The adapter names its base by the absolute path sdft loaded it from (peft writes the path as it was
    given, which a relative one makes wrong from any other folder); ``_hub_base`` turns a Hub snapshot's path
    into its Hub id once saved."""
    from sdft.models.loading import SOURCE_UNKNOWN, model_source

    source = model_source(model.get_base_model())
    if source is not None and source != SOURCE_UNKNOWN:
        for config in model.peft_config.values():
            config.base_model_name_or_path = source


def export_checkpoint(checkpoint, out, model=None, merge_lora: bool = False, force: bool = False) -> Path:
    """``sdft export``: rebuild the trained model from a checkpoint and write it as ``export_model`` does.

    ``model``: the base model's path (default: the one the checkpoint records; None there means the
    embedded SmolLM2). Every check (checkpoint, target, recorded source) runs before the model loads.
    """
    from sdft.run.checkpoint import checkpoint_state

    out, path = Path(out).expanduser(), Path(checkpoint).expanduser()
    check_checkpoint(checkpoint)
    state = checkpoint_state(path)
    _check_apart(path, out, _base_source(state, model))
    _check_final_model(path, out)
    check_target(out, force)
    base, tokenizer = _checked_checkpoint_model(path, model, state)
    return export_model(base, tokenizer, out, merge_lora, force)


def check_checkpoint(checkpoint) -> None:
    """``checkpoint`` is a whole sdft checkpoint, or one line says what is wrong with it."""
    from sdft.run.checkpoint import damage
    from sdft.run.run_dir import checkpoint_error

    path = Path(checkpoint).expanduser()
    problem = damage(path)
    if problem is not None:
        raise checkpoint_error(path, problem, "export")


def load_checkpoint_model(checkpoint, model=None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) a checkpoint holds: its base (``model``, or the one it records; None there means
    the embedded SmolLM2) with its trained weights (LoRA adapters applied as it was trained), in ``dtype``
    (the base loads in it: no float32 copy first). The checkpoint and the base are checked before the base
    loads."""
    check_checkpoint(checkpoint)
    loaded, tokenizer = _checked_checkpoint_model(Path(checkpoint).expanduser(), model, dtype=dtype)
    return loaded.to(dtype), tokenizer  # LoRA adapters too (peft makes them in float32 over a 16-bit base)


def _base_source(state: dict, model):
    """The base model a checkpoint's weights load onto: ``model`` when given (the Hub id of the recorded base: the
    commit recorded), else the one its state records."""
    from sdft.models import hub

    if model is None:
        return state.get("model")
    return hub.recorded_snapshot(model, state.get("model")) or model


def _checked_checkpoint_model(checkpoint: Path, model, state: dict | None = None,
                              dtype: torch.dtype = torch.float32):
    """``load_checkpoint_model`` for a checkpoint ``check_checkpoint`` passed (its files are hashed once);
    ``state``: its state.json when already read."""
    from sdft.config import SDFTConfig
    from sdft.models import hub, load_model
    from sdft.models.loading import SOURCE_UNKNOWN, source_of
    from sdft.models.lora import LoraSettings, apply_lora
    from sdft.run.checkpoint import checkpoint_state, load_trainable
    from sdft.run.run_dir import other_base

    state = state if state is not None else checkpoint_state(checkpoint)
    source = _base_source(state, model)
    if source == SOURCE_UNKNOWN:
        raise ValueError(f"{checkpoint} was trained from a model object built outside sdft.load_model, so it "
                         "does not say which base model it needs: pass the base model's path (--model)")
    if (source is not None and not Path(source).expanduser().exists() and hub.origin(source) is None
            and not hub.is_repo_id(source)):
        raise FileNotFoundError(f"{checkpoint} was trained from {source}, which is not here: pass the base "
                                "model's path on this machine (--model)")
    trained_from = other_base(checkpoint, source_of(source))
    if trained_from is not None:
        raise ValueError(f"{checkpoint} was trained from {trained_from}, which is still here, not from {source}: "
                         "drop --model to use its own base")
    config = SDFTConfig.from_dict(state["config"])
    base, tokenizer = load_model(source, dtype)
    if config.use_lora:
        base = apply_lora(base, LoraSettings.from_config(config))
    load_trainable(checkpoint, base)
    return base, with_template_kwargs(tokenizer, config.chat_template_kwargs)  # as the run rendered its chats
