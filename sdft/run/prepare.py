"""Setting a run up: config, data and output_dir checked before any model loads, then the model loaded and
placed (``prepare`` gives the ``Run`` that ``sdft.run.loop`` trains), shared by SDFT and the SFT baseline."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdft.config import SDFTConfig
from sdft.data.chat import has_chat_template, with_template_kwargs
from sdft.data.examples import Example, eval_sets, load_eval_sets, load_examples
from sdft.data.sources import HELD_OUT_SPLIT
from sdft.eval import retention
from sdft.eval.scorers import get_scorer
from sdft.models import enable_checkpointing, load_model
from sdft.models.attention import use_implementation
from sdft.models.head import verify_head
from sdft.models.loading import is_embedded, load_tokenizer, meta_model, model_source
from sdft.models.lora import LoraSettings, adapters_of, apply_lora, check_targets
from sdft.models.positions import position_limit
from sdft.models.vocabulary import check_vocabulary, embedding_rows
from sdft.run.errors import OutOfMemory
from sdft.run.lock import RunLock, RunLockedError
from sdft.run.reporting import check_backends
from sdft.run.run_dir import (
    check_model_folder,
    check_run_model,
    plan_run,
    report_line,
    resume_base,
)
from sdft.run.schedule import LRSchedule
from sdft.runtime.determinism import deterministic_algorithms
from sdft.runtime.distributed import World, all_reduce_sum, setup
from sdft.runtime.inference import run_device
from sdft.runtime.parallel import Runner
from sdft.runtime.precision import compute_precision, cpu_precision_note, tf32_matmuls


def as_config(config) -> SDFTConfig:
    if config is None:
        return SDFTConfig()
    if isinstance(config, dict):
        return SDFTConfig.from_dict(config)
    if not isinstance(config, SDFTConfig):
        raise TypeError(f"config must be an SDFTConfig, a dict or None, got {type(config).__name__}")
    return config


@dataclass
class Run:
    """What ``prepare`` sets up for a training loop."""

    config: SDFTConfig
    model: object
    tokenizer: object
    examples: list[Example]
    device: torch.device
    resume: Path | None
    model_source: str | None  # the base model's path; None: the embedded model (see sdft.run.export)
    eval_examples: list[Example] | dict | None = None  # config.eval_data or eval_dataset (one set, or name -> set)
    eval_scorer: object = None  # a scorer callable (sdft.eval.scorers)
    world: World = World()  # this process's place under torchrun / accelerate (sdft.runtime.distributed)
    runner: Runner | None = None  # how the model runs here: alone, DDP or FSDP2 (start_runner)
    on_end: list = field(default_factory=list)  # called when run_steps ends: release the lock, restore switches
    retention: object = None  # what the run must keep (sdft.eval.retention.Retention), scored with each evaluation
    encoded: list | None = None  # the rows' token ids on the CPU, as ``prepare``'s ``encode`` gave them


def with_model_adapters(config: SDFTConfig, model) -> SDFTConfig:
    """``config`` with the LoRA keys of a model object that already carries peft adapters (said in one line
    where they differ from the config's): its checkpoints then name the adapters they hold."""
    values = adapters_of(model) if isinstance(model, torch.nn.Module) else {}
    changed = {k: v for k, v in values.items() if getattr(config, k) != v}
    if not changed:
        return config
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        report_line("sdft: the model carries peft LoRA adapters, which train as "
                    + " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in values.items()))
    return SDFTConfig.from_dict({**config.to_dict(), **values})


def start_runner(run: Run, teacher=None) -> Runner:
    """Wrap the model for this process (DDP, FSDP2 or alone) once any teacher copy has been made from
    the full weights; a sharded student gets a teacher copy sharded the same way."""
    run.runner = Runner(run.model, run.world, run.config.parallel,
                        compute_precision(run.config.mixed_precision, run.device), run.config.cpu_trim_memory)
    if teacher is not None:
        teacher.distribute(run.runner)
    return run.runner


@dataclass(frozen=True)
class Checked:
    """What the checks a run makes before any model loads give it (``check_run``)."""

    config: SDFTConfig
    model: object  # what the run loads: None, a path (a Hub id resumed at its checkpoint's commit) or an object
    examples: list[Example]
    eval_examples: list[Example] | dict | None
    retention: object  # sdft.eval.retention.resolve's: what the run must keep, or None
    resume: Path | None  # the checkpoint the run continues from


def check_settings(config: SDFTConfig) -> None:
    """The checks of a config that read nothing else: its loggers are installed, its schedule takes its
    keywords, its device is here."""
    check_backends(config.report_to)
    LRSchedule.from_config(config).check()
    config.check_device()


def check_run(model, dataset, config, tokenizer=None, eval_dataset=None, report=report_line) -> Checked:
    """Every check of a run that needs no weights, cheap ones first: config, device, evaluation and
    retention data, the training rows, ``output_dir``, and the model against them. ``report``: where the
    lines a run says once go (``sdft train --dry-run`` prints them with its plan). ``dataset`` None: the
    bundled skill; ``eval_dataset`` (rows as ``dataset`` takes them) stands in for ``config.eval_data``."""
    config = with_model_adapters(as_config(config), model)
    check_settings(config)
    if model is not None and not isinstance(model, (str, Path, torch.nn.Module)):
        raise TypeError(f"model must be None (the embedded model), a local path or a transformers model, "
                        f"got {type(model).__name__}")
    if model is not None and not isinstance(model, (str, Path)) and tokenizer is None:
        raise ValueError("pass the tokenizer together with a model object")
    if isinstance(model, torch.nn.Module):
        check_vocabulary(tokenizer, embedding_rows(model), "the model object")
    if eval_dataset is not None:
        eval_examples = load_eval_sets(eval_dataset, config.column_map)
    else:
        eval_examples = (load_examples(config.eval_data, split=HELD_OUT_SPLIT, column_map=config.column_map)
                         if config.eval_data else None)
    evaluating = eval_examples is not None
    kept = retention.resolve(config.retention_data, config.retention_text, config.retention_scorer, is_embedded(model),
                             evaluating=evaluating, report=report)
    check_evaluation(config, eval_examples, kept)
    if dataset is None:
        from sdft.data.skill import load_skill

        dataset = load_skill("train")
    examples = load_examples(dataset, column_map=config.column_map)
    resume = plan_run(config, report=report, evaluating=evaluating)
    model = resume_base(model, resume)
    check_model_folder(model)
    check_run_model(config, resume, model, evaluating=evaluating, report=report)
    if config.use_lora:
        check_lora_layers(model, config.lora_target_modules)
    return Checked(config, model, examples, eval_examples, kept, resume)


def check_lora_layers(model, names) -> None:
    """``lora_target_modules`` name layers the model has, read from its config (on the meta device) before its
    weights load; a model object is checked where its adapters are made (``apply_lora``)."""
    if isinstance(model, torch.nn.Module):
        return
    try:
        meta = meta_model(model)
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError):  # loading says why, in one line
        return
    if meta is not None:
        check_targets(meta, names)


def prepare(model, dataset, config, tokenizer, eval_scorer=None, eval_dataset=None, encode=None) -> Run:
    """Validate config, data and output_dir (``check_run``: cheap, before any model loads), then load the model.

    ``eval_dataset`` (rows as ``dataset`` takes them) stands in for ``config.eval_data``. ``encode(examples,
    tokenizer, config, positions=)``: the rows' token ids on the CPU (``Run.encoded``), taken before the
    weights load, so that a row over the length limits (or the model's positions) is one line before a
    large model loads."""
    checked = check_run(model, dataset, config, tokenizer, eval_dataset)
    config, model, examples, eval_examples, resume = (checked.config, checked.model, checked.examples,
                                                      checked.eval_examples, checked.resume)
    eval_scorer = get_scorer(eval_scorer if eval_scorer is not None else config.eval_scorer)
    world = setup(config.device)
    lock = _take_output_dir(config.output_dir, world)
    on_end = [lock.release] if lock is not None else []
    if world.is_main:
        precision = cpu_precision_note(config.mixed_precision, run_device(config.device), config.dtype)
        for note in data_notes(examples, eval_examples, config, world.size) + [precision]:
            if note is not None:
                report_line(note)
    try:
        on_end.append(deterministic_algorithms(config.full_determinism))
        on_end.append(tf32_matmuls(config.tf32))
        run = _load(model, tokenizer, config, examples, resume, eval_examples, eval_scorer, world, on_end, encode)
        run.retention = checked.retention
        return run
    except BaseException:
        end_run(on_end)
        raise


def parameters_text(count: int) -> str:
    """A parameter count as people say it: 1.5B, 135.0M."""
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def data_notes(examples, eval_examples, config, processes: int) -> list[str]:
    """What a user may not have meant, said once: a step that takes more prompts than the data holds, and
    held-out rows that are training rows (their score then measures recall, not the skill)."""
    notes = []
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * processes
    if per_step > len(examples):
        notes.append(f"sdft: a step takes {per_step} prompts (per_device_train_batch_size x "
                     f"gradient_accumulation_steps x processes) from {len(examples)} rows: each step sees some "
                     "rows more than once")
    trained = set(examples)
    for name, held_out in eval_sets(eval_examples).items():
        shared = sum(ex in trained for ex in held_out)
        if shared:
            of = f" of eval_dataset[{name!r}]" if name else ""
            notes.append(f"sdft: {shared} of the {len(held_out)} evaluation rows{of} are also training rows: "
                         "their score measures recall of what was trained, not the skill on new prompts")
    return notes


EVAL_FIGURES = ("score", "perplexity", "loss")  # what each evaluation set gives to rank by (loss: not under FSDP2)


def check_evaluation(config, eval_examples, kept) -> None:
    """What the evaluation settings need, one line before the model loads: something to evaluate for
    ``eval_steps`` (as HF's Trainer refuses eval_strategy='steps' without an eval_dataset), and the figure
    ``load_best_model_at_end`` ranks by. ``eval_examples``: the held-out rows (None: none); ``kept``: the
    retention check (``sdft.eval.retention.resolve``)."""
    if config.evaluation_rule and eval_examples is None and kept is None:
        raise ValueError(f"{config.evaluation_rule} evaluates eval_data during training, and the run has none: "
                         "give eval_data (or retention_data), or set eval_steps=0 and eval_strategy=steps")
    if config.save_strategy == "best" and not config.evaluation_rule:
        raise ValueError("save_strategy=best checkpoints after an evaluation during training that beats the earlier "
                         "ones: set eval_steps (or eval_strategy=epoch) and give eval_data")
    ranking = ("load_best_model_at_end" if config.load_best_model_at_end else
               "save_strategy=best" if config.save_strategy == "best" else None)  # what ranks the evaluations
    if ranking is not None:
        check_best_metric(config.metric_for_best_model, eval_examples is not None, kept,
                          list(eval_examples) if isinstance(eval_examples, dict) else (), ranking)


def check_best_metric(metric: str, evaluating: bool, kept, named=(), setting="load_best_model_at_end") -> None:
    """``setting`` (load_best_model_at_end, save_strategy=best) needs an evaluation that yields ``metric``: one
    line before the model loads. ``named``: the names of the evaluation sets, where there are several (their
    figures are NAME_score, ...)."""
    if metric in ("retention_score", "retention_text_perplexity"):
        if not (kept is not None and (kept.examples if metric == "retention_score" else kept.texts)):
            source = "retention_data" if metric == "retention_score" else "retention_text"
            raise ValueError(f"metric_for_best_model={metric} needs {source} (and eval_data to evaluate at all)")
        return
    if not evaluating:
        raise ValueError(f"{setting} ranks the evaluations on eval_data by {metric}: give eval_data")
    figures = [f"{n}_{f}" for n in named for f in EVAL_FIGURES] if named else list(EVAL_FIGURES)
    if metric not in figures:
        raise ValueError(f"metric_for_best_model={metric}: the evaluation gives {', '.join(figures)}")


def end_run(on_end: list):
    for fn in reversed(on_end):
        fn()


def disable_dropout(model):
    """Every ``nn.Dropout`` of ``model`` to p=0 (TRL's ``disable_dropout``): the student's log-probs
    then match what the teacher and the rollouts saw."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _take_output_dir(output_dir, world: World) -> RunLock | None:
    """Process 0 locks the output_dir; every process learns whether it could (one line if not)."""
    lock, refusal = None, ""
    if world.is_main:
        try:
            lock = RunLock(output_dir, report=report_line).acquire()
        except RunLockedError as err:
            refusal = str(err)
        except OSError as err:
            refusal = f"cannot write in output_dir {output_dir}: {err.strerror or err}"
    if all_reduce_sum(0.0 if lock is not None or not world.is_main else 1.0, world):
        raise RunLockedError(refusal or f"output_dir {output_dir} is in use by another sdft run")
    return lock


def _load(model, tokenizer, config, examples, resume, eval_examples, eval_scorer, world, on_end, encode) -> Run:
    """The part of ``prepare`` after the checks: the rows' token ids, then load and place the model."""
    device = run_device(config.device)
    if world.active and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    torch.manual_seed(config.seed)
    encoded, positions = None, position_limit(model)
    template_kwargs = config.chat_template_kwargs
    if model is None or isinstance(model, (str, Path)):
        tokenizer = load_tokenizer(model)  # None: the embedded model's first load (its rows are measured after)
        if tokenizer is not None and encode is not None:
            tokenizer = with_template_kwargs(tokenizer, template_kwargs)
            encoded = encode(examples, tokenizer, config, positions=positions)
        model, tokenizer = load_model(model, getattr(torch, config.dtype), tokenizer)
    tokenizer = with_template_kwargs(tokenizer, template_kwargs)  # every chat of the run renders with them
    if encoded is None and encode is not None:
        encoded = encode(examples, tokenizer, config, positions=positions)
    source = model_source(model)  # load_model tags what it loaded; a foreign object is SOURCE_UNKNOWN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not has_chat_template(tokenizer) and world.is_main:
        report_line("sdft: the tokenizer has no chat template (a base model's): prompts and demonstrations are "
                    "plain text, turns joined by blank lines, each demonstration ended with EOS (sdft.data.chat)"
                    + ("; chat_template_kwargs are unused" if template_kwargs else ""))
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model object's weights are not loaded ({meta} is on the meta device): load them "
                         "(from_pretrained, or to_empty and load_state_dict) before training")
    try:
        model.to(device)
    except torch.OutOfMemoryError:
        size = parameters_text(sum(p.numel() for p in model.parameters()))
        raise OutOfMemory(f"the model does not fit on {device} in {config.dtype} ({size} parameters): "
                          "dtype=bfloat16 halves its weights, a device with more memory or "
                          "parallel=fsdp over several shards them") from None
    on_end.append(use_implementation(model, config.attn_implementation))  # for the run only
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.disable_dropout:
        disable_dropout(model)
    if config.use_lora and not adapters_of(model):  # a peft model's own adapters train as they are
        model = apply_lora(model, LoraSettings.from_config(config))
    verify_head(model)  # a head sdft cannot express is refused here, before any step
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (requires_grad is False on every one): unfreeze "
                         "the ones to train, or set use_lora=true to train adapters on the frozen model")
    if world.is_main and any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        report_line("sdft: the model's trainable weights are float16: they train in float16 with no loss scaling "
                    "(updates below 2^-11 of a weight round away, AdamW's state in float16); load the model in "
                    "float32 (mixed_precision=fp16 computes in fp16 on fp32 master weights) or in bfloat16")
    model.train()
    return Run(config, model, tokenizer, examples, device, resume, source, eval_examples, eval_scorer, world,
               on_end=on_end, encoded=encoded)
