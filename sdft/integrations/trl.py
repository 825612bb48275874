"""A drop-in for TRL users: the same constructor as ``trl.experimental.sdft.SDFTTrainer``, run by sdft.

    from sdft.integrations.trl import SDFTTrainer      # instead of trl.experimental.sdft
    trainer = SDFTTrainer(model="path/or/model", args=trl_sdft_config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()

``args`` is TRL's ``SDFTConfig`` (or anything with its attribute names, or a dict); its fields are
translated by ``config_from_trl``: the same objective (``distillation_alpha`` 0 / 1 / between ->
forward KL / reverse KL / JSD, ``distillation_mode``, ``distillation_topk``, ...), teacher
(``teacher_model_kind``, ``teacher_update_rate``, ``teacher_prompt_template``), batch (TRL's
``per_device_train_batch_size`` counts completions: prompts = it / ``num_generations``), optimiser,
schedule and bookkeeping. Every TRL field is classified in ``trl_fields`` (honoured, refused with a
one-line error when set, or irrelevant with its reason), so none is silently ignored; pass a rollout
engine (``engine=``) for vLLM. TRL's ``distillation_is_clip`` only acts on reused rollouts, which sdft never
reuses, so it is not carried over. ``bf16=True`` (TRL's default) is ``mixed_precision=bf16``: autocast compute on fp32
master weights and optimizer state, as in TRL; ``fp16=True`` is ``mixed_precision=fp16``, the same with dynamic loss
scaling (the HF Trainer's GradScaler defaults).

Prompts as TRL reads them (``trl_examples``): a list of messages (conversational) goes through the chat
template, a string (TRL's standard format) is plain text, the teacher's context too
(``teacher_prompt_template`` formatted as text). sdft's own API and CLI differ there: a string prompt is
one user turn of a chat, wherever the tokenizer has a template.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import TrainOutput

from sdft.config import LR_SCHEDULES, SDFTConfig
from sdft.data.examples import as_plain, eval_sets, load_examples, named_sets
from sdft.integrations.hub_push import HubPush, check_card
from sdft.integrations.trl_fields import arg, check_fields, model_init_values, model_revision, plain
from sdft.loss.spec import divergence_from_alpha
from sdft.models import hub
from sdft.models.lora import lora_values
from sdft.run.loop import TrainResult, save_due
from sdft.run.metrics import logs_step
from sdft.run.reporting import train_scalars
from sdft.run.run_dir import OutputDirInUse, replace_file
from sdft.run.schedule import LRSchedule
from sdft.run.trainer import train
from sdft.runtime.distributed import launched_size


def config_from_trl(args, num_examples: int | None = None, world_size: int = 1) -> SDFTConfig:
    """An ``SDFTConfig`` meaning what TRL's ``SDFTConfig`` ``args`` means (see the module docstring)."""
    check_fields(args)  # every TRL field is honoured, refused here, or irrelevant (trl_fields)
    group = int(arg(args, "num_generations", 8))
    per_device = int(arg(args, "per_device_train_batch_size", 8))
    if per_device % group:
        raise ValueError(f"per_device_train_batch_size={per_device} (completions, as in TRL) must be a multiple of "
                         f"num_generations={group}")
    prompts = per_device // group
    accumulation = int(arg(args, "gradient_accumulation_steps", 1))
    max_steps = int(arg(args, "max_steps", -1))
    if max_steps <= 0:
        if num_examples is None:
            raise ValueError("max_steps is not set: give max_steps, or a train_dataset to count epochs over")
        per_step = prompts * accumulation * world_size
        max_steps = max(1, math.ceil(float(arg(args, "num_train_epochs", 3.0)) * num_examples / per_step))
    divergence, beta = divergence_from_alpha(float(arg(args, "distillation_alpha", 0.5)))
    schedule = str(plain(arg(args, "lr_scheduler_type", "linear")))
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_scheduler_type={schedule!r}: sdft takes the schedules that are a function of the step "
                         f"({', '.join(LR_SCHEDULES)}), not one that follows an evaluation metric")
    warmup = _warmup(arg(args, "warmup_steps", 0) or 0, arg(args, "warmup_ratio", None) or 0.0, schedule)
    report_to = arg(args, "report_to", None) or ["none"]
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    report_to = [r for r in report_to if r in ("tensorboard", "wandb", "trackio")] or ["none"]
    values = dict(
        output_dir=str(arg(args, "output_dir", "sdft-output")),
        learning_rate=float(arg(args, "learning_rate", 5e-5)),
        weight_decay=float(arg(args, "weight_decay", 0.0)),
        optim=str(plain(arg(args, "optim", "adamw_torch_fused"))),
        optim_args=str(arg(args, "optim_args", None) or ""),
        adam_beta1=float(arg(args, "adam_beta1", 0.9)),
        adam_beta2=float(arg(args, "adam_beta2", 0.999)),
        adam_epsilon=float(arg(args, "adam_epsilon", 1e-8)),
        max_grad_norm=float(arg(args, "max_grad_norm", 1.0) or 0.0),  # None or 0: no clipping, as the Trainer
        max_steps=max_steps,
        per_device_train_batch_size=prompts,
        gradient_accumulation_steps=accumulation,
        seed=int(arg(args, "seed", 42)),
        data_seed=-1 if arg(args, "data_seed", None) is None else int(arg(args, "data_seed")),
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs=dict(arg(args, "lr_scheduler_kwargs", None) or {}),
        **warmup,
        gradient_checkpointing=bool(_checkpointing(args)),
        num_generations=group,
        num_generations_eval=int(arg(args, "num_generations_eval", None) or 0),
        **sampling_values(args),
        chat_template_kwargs=dict(arg(args, "chat_template_kwargs", None) or {}),
        tf32=bool(arg(args, "tf32", None) or False),
        max_prompt_length=int(arg(args, "max_prompt_length", None) or 1_000_000),
        max_completion_length=int(arg(args, "max_completion_length", None) or 256),
        divergence=divergence,
        distillation_alpha=beta,
        distillation_mode=str(arg(args, "distillation_mode", "topk_logits")),
        distillation_topk=int(arg(args, "distillation_topk", None) or 100),
        distillation_add_tail=bool(arg(args, "distillation_add_tail", False)),
        num_loss_tokens_to_skip=int(arg(args, "num_loss_tokens_to_skip", 0)),
        loss_normalization="sequence_mean",
        teacher_model_kind=str(arg(args, "teacher_model_kind", "base")),
        teacher_update_rate=float(arg(args, "teacher_update_rate", 0.05)),
        teacher_sync_steps=int(arg(args, "teacher_sync_steps", 1)),
        teacher_prompt_template=str(arg(args, "teacher_prompt_template", "{prompt}\n\n{privileged_context}")),
        generate_from_teacher=bool(arg(args, "generate_from_teacher", False)),
        logging_steps=every_steps(arg(args, "logging_steps", 10), max_steps),
        logging_first_step=bool(arg(args, "logging_first_step", False)),
        save_strategy=str(plain(arg(args, "save_strategy", "steps"))),
        save_steps=every_steps(arg(args, "save_steps", 500), max_steps),
        save_total_limit=int(arg(args, "save_total_limit", None) or 0),
        save_only_model=bool(arg(args, "save_only_model", False)),
        report_to=report_to,
        project=str(arg(args, "project", None) or "sdft"),
        trackio_space_id=str(arg(args, "trackio_space_id", None) or ""),
        device="cpu" if arg(args, "use_cpu", False) else "auto",
        resume_from_checkpoint=arg(args, "resume_from_checkpoint", None) or False,
        overwrite_output_dir=bool(arg(args, "overwrite_output_dir", False)),
        mixed_precision=_precision(arg(args, "bf16", None), arg(args, "fp16", False)),
        **model_init_values(args),
        disable_dropout=bool(arg(args, "disable_dropout", True)),
        full_determinism=bool(arg(args, "full_determinism", False)),
        progress_bar=not arg(args, "disable_tqdm", False),
        **evaluation_values(args, max_steps),
    )
    config = SDFTConfig.from_dict(values)
    LRSchedule.from_config(config).check()  # TRL's lr_scheduler_kwargs are the scheduler's: checked by it now
    return config


# What an evaluation reports of each set, as eval_KEY (loss: during training, not under FSDP2)
EVAL_KEYS = ("score", "perplexity", "examples", "loss")
BEST_METRICS = {"score": "score", "eval_score": "score", "perplexity": "perplexity", "eval_perplexity": "perplexity",
                "loss": "loss", "eval_loss": "loss"}  # the Trainer's default with load_best_model_at_end: loss
NAMED_BEST = re.compile(r"eval_(.+)_(score|perplexity|loss)")  # a figure of one of eval_dataset={name: ...}'s sets


def _warmup(steps: float, ratio: float, schedule: str) -> dict:
    """TRL's warmup as sdft's fields. transformers 5 has ``warmup_steps`` alone: a whole number of steps, or
    below 1 a share of them (rounded up); older versions a separate ``warmup_ratio``, which ``warmup_steps``
    overrides. HF's plain ``constant`` schedule takes no warmup at all (``constant_with_warmup`` does)."""
    if schedule == "constant":
        return {}
    if steps >= 1:
        return {"warmup_steps": int(steps)}
    return {"warmup_ratio": float(steps or ratio)}


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")  # generation_kwargs may set them


def sampling_values(args) -> dict:
    """TRL's ``temperature`` / ``top_k`` / ``top_p`` / ``min_p``, overridden by the same keys of
    ``generation_kwargs`` as TRL's ``GenerationConfig`` is; any other generation argument is refused."""
    extra = dict(arg(args, "generation_kwargs", None) or {})
    if extra.get("do_sample", True) is not True:
        raise ValueError("generation_kwargs do_sample=False: SDFT's rollouts are sampled on-policy")
    extra.pop("do_sample", None)
    other = sorted(set(extra) - set(SAMPLING_KEYS))
    if other:
        raise ValueError(f"generation_kwargs {other[0]!r}: sdft's rollouts take only {', '.join(SAMPLING_KEYS)} "
                         "from generation_kwargs")
    value = {k: extra.get(k, arg(args, k, None)) for k in SAMPLING_KEYS}
    return dict(temperature=float(1.0 if value["temperature"] is None else value["temperature"]),
                top_k=int(value["top_k"] or 0), top_p=float(1.0 if value["top_p"] is None else value["top_p"]),
                min_p=float(value["min_p"] or 0.0),
                repetition_penalty=float(1.0 if value["repetition_penalty"] is None else value["repetition_penalty"]))


def every_steps(value, max_steps: int) -> int:
    """A ``*_steps`` field as the Trainer reads it: below 1, a fraction of max_steps (rounded up)."""
    value = float(value)
    return max(1, math.ceil(value * max_steps)) if value < 1 else int(value)


def evaluation_values(args, max_steps: int) -> dict:
    """TRL's ``eval_strategy`` / ``eval_steps`` / ``load_best_model_at_end`` / ``metric_for_best_model`` /
    ``greater_is_better`` as sdft's ``eval_steps`` (0: no evaluation during training) and selection keys."""
    strategy = str(plain(arg(args, "eval_strategy", "no")))
    if strategy not in ("no", "steps", "epoch"):
        raise ValueError(f"eval_strategy={strategy!r}: sdft evaluates as it trains every eval_steps ('steps') or "
                         "epoch ('epoch'), or not ('no')")
    every = 0
    if strategy == "steps":
        given = arg(args, "eval_steps", None)
        given = float(arg(args, "logging_steps", 10) if given is None else given)  # HF: logging_steps when unset
        every = every_steps(given, max_steps)
    load_best = bool(arg(args, "load_best_model_at_end", False))
    for setting, on in (("load_best_model_at_end=True", load_best),
                        ("save_strategy='best'", plain(arg(args, "save_strategy", "steps")) == "best")):
        if on and not every and strategy != "epoch":
            raise ValueError(f"{setting} ranks the evaluations during training: set eval_strategy='steps' or "
                             "'epoch' (and pass an eval_dataset)")
    name = arg(args, "metric_for_best_model", None)
    named = NAMED_BEST.fullmatch(str(name)) if name is not None else None
    if name is not None and str(name) not in BEST_METRICS and not named:
        raise ValueError(f"metric_for_best_model={name!r}: sdft's evaluation gives eval_score, eval_perplexity and "
                         "eval_loss (eval_NAME_score, ... for eval_dataset={NAME: ...})")
    metric = "score" if name is None else BEST_METRICS.get(str(name)) or f"{named[1]}_{named[2]}"
    greater = arg(args, "greater_is_better", None)
    if load_best and greater is not None and bool(greater) != metric.endswith("score"):
        raise ValueError(f"greater_is_better={greater}: {metric} is better when "
                         f"{'higher' if metric.endswith('score') else 'lower'}")
    return dict(eval_steps=every, eval_strategy="epoch" if strategy == "epoch" else "steps",
                load_best_model_at_end=load_best, metric_for_best_model=metric)


def _checkpointing(args) -> bool:
    """transformers 5's activation_checkpointing when set, else the older gradient_checkpointing."""
    value = arg(args, "activation_checkpointing", None)
    return arg(args, "gradient_checkpointing", True) if value is None else value


def trl_examples(dataset) -> list:
    """``load_examples`` under TRL's rule for prompts: a string (TRL's standard format) is plain text, a list
    of messages (conversational) goes through the chat template. A path is read as sdft reads it."""
    examples = load_examples(dataset)
    if isinstance(dataset, (str, Path)):
        return examples
    if isinstance(dataset, dict):
        prompts = list(dataset.get("prompt", []))
    else:
        prompts = [row.get("prompt") if isinstance(row, dict) else None for row in dataset]
    return [as_plain(ex) if isinstance(prompt, str) else ex for ex, prompt in zip(examples, prompts)]


def _own_tokenizer(model):
    """As TRL, a model object given without ``processing_class`` gets the tokenizer of the folder or Hub model it
    was loaded from (``config._name_or_path``); None for a path (sdft loads its tokenizer with it)."""
    if isinstance(model, (str, Path)) or model is None:
        return None
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not source or not (Path(source).expanduser().is_dir() or hub.is_repo_id(source)):
        where = f"names {source!r}, which is not a local folder" if source else "names no folder it came from"
        raise ValueError(f"pass processing_class (the model's tokenizer): the model object {where} to load "
                         "its tokenizer from")
    from sdft.models.loading import load_tokenizer

    return load_tokenizer(source)


def trl_eval_sets(dataset):
    """Held-out rows under TRL's prompt rule (``trl_examples``): one set, or a name -> set mapping
    (``eval_dataset={name: dataset}``, a DatasetDict among them), as the Trainer takes them."""
    sets = named_sets(dataset)
    if sets is None:
        return trl_examples(dataset)
    return {key: trl_examples(value) for key, value in sets.items()}


def _names(callback) -> str:
    """A callback's class name, given the class or an instance (as the Trainer's add_callback takes either)."""
    return callback.__name__ if isinstance(callback, type) else type(callback).__name__


def _handler(callbacks: list, model, processing_class) -> CallbackHandler:
    """The Trainer's ``CallbackHandler`` over the user's callbacks. transformers warns when it lacks its
    ``DefaultFlowCallback``, which decides when a Trainer logs, saves and evaluates: here sdft's loop
    decides that, so the warning would only be noise."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return CallbackHandler(callbacks, model, processing_class, None, None)
    finally:
        logging.set_verbosity(level)


def _precision(bf16, fp16) -> str:
    """TRL's ``bf16`` / ``fp16`` as sdft's ``mixed_precision``: bf16=True is autocast bf16 on fp32 master
    weights (TRL's meaning), fp16=True the same in fp16 with loss scaling, both False fp32; bf16 not given
    (and no fp16): sdft's ``auto`` (bf16 on a CUDA device with bf16, fp32 elsewhere)."""
    if fp16 and bf16:
        raise ValueError("bf16=True and fp16=True: set one of them (as the transformers Trainer requires)")
    if fp16:
        return "fp16"
    return "auto" if bf16 is None else "bf16" if bf16 else "no"


class ProcessView:
    """The part of ``accelerate.Accelerator`` that TRL's scripts use after training, for sdft's own launch
    (torchrun / accelerate environment variables; no accelerate state is created)."""

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", "0"))

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def num_processes(self) -> int:
        return launched_size()

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    def print(self, *args, **kwargs):
        """Print once per machine, as ``Accelerator.print``."""
        if self.is_local_main_process:
            print(*args, **kwargs)

    def wait_for_everyone(self):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def end_training(self):
        """Nothing to finish: sdft's loggers close at the end of train()."""


class SDFTTrainer:
    """``trl.experimental.sdft.SDFTTrainer`` as a user drives it (constructor, ``train``, ``evaluate``,
    ``save_model``, ``state``, callbacks), with each step run by ``sdft.train``.

    * ``train(resume_from_checkpoint=None)`` returns transformers' ``TrainOutput``; ``state`` is a
      ``TrainerState`` whose ``log_history`` holds each logged step under TRL's metric names, then
      the run's summary (``train_runtime``, ``train_loss``, ...), as the Trainer keeps it.
    * ``callbacks`` (``TrainerCallback`` objects) are called at the Trainer's points: ``on_init_end``,
      ``on_train_begin``, ``on_step_begin``, ``on_step_end``, ``on_log``, ``on_save``, ``on_train_end``,
      ``on_evaluate``;
      ``control.should_training_stop`` set by one ends the run after that step (its checkpoint written);
      ``add_callback``, ``pop_callback``, ``remove_callback`` and ``log`` as the Trainer's.
    * ``evaluate(eval_dataset=None)`` answers the held-out prompts greedily and returns
      ``{"eval_score", "eval_perplexity", "eval_examples"}`` (``eval_scorer``: ``sdft.eval.scorers``'s
      names or a callable; default ``exact``). The SDFT loss on held-out data is not computed.
      ``eval_dataset={name: dataset}`` evaluates each set, named ``eval_{name}_score``, ... as the Trainer
      names them. ``eval_strategy="steps"`` does the same during training every ``eval_steps`` (and before the
      first step), each in ``log_history`` and through ``on_evaluate``; ``load_best_model_at_end``
      ends the run on the best of them (``metric_for_best_model``: ``eval_score`` or
      ``eval_perplexity``, or ``eval_{name}_score`` / ``eval_{name}_perplexity``), with
      ``state.best_global_step`` and ``state.best_metric``.
    * ``optimizers`` other than ``(None, None)`` are refused: sdft builds the optimizer from ``args`` (``optim``,
      ``optim_args``, the Adam keys, ``weight_decay``) as the Trainer does, and its schedule.
    * ``model``: a model object, a local folder or a Hugging Face Hub id (at ``model_init_kwargs``' revision),
      as TRL takes it (``sdft.models.hub``).
    * The rest of TRL's scripts (``trl/scripts/*.py``) runs as there: ``accelerator.print`` (and the
      process facts a script reads from ``accelerator``, ``ProcessView``) and ``end()``; so does the HF
      Trainer's tail: ``log_metrics``, ``save_metrics`` (``{split}_results.json``, ``all_results.json``) and
      ``save_state`` (``trainer_state.json``) in output_dir.
    """

    @property
    def accelerator(self) -> "ProcessView":
        """What TRL's scripts ask of ``trainer.accelerator``: this process's place and a print on one process."""
        return ProcessView()

    def end(self):
        """As ``Trainer.end`` (transformers 5.18+, the last line of TRL's scripts): the process group goes."""
        from sdft.runtime.distributed import _destroy_group

        _destroy_group()

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 callbacks=None, peft_config=None, optimizers=(None, None), engine=None, eval_scorer="exact"):
        if train_dataset is None:
            raise ValueError("SDFTTrainer needs a train_dataset (columns prompt and privileged_context)")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ValueError("optimizers=(optimizer, scheduler): sdft builds the optimizer from args (optim, "
                             "optim_args, adam_*, weight_decay) and the schedule (learning_rate, lr_scheduler_type, "
                             "warmup_*) as the Trainer does; pass (None, None)")
        self.examples = trl_examples(train_dataset)
        config = config_from_trl(args if args is not None else {}, len(self.examples), launched_size())
        if peft_config is not None:
            config = SDFTConfig.from_dict({**config.to_dict(), **lora_values(peft_config)})
        self.args, self.trl_args = config, args
        model = hub.at_revision(model, model_revision(args if args is not None else {}))  # as TRL loads a Hub id
        self.model, self.processing_class = model, processing_class or _own_tokenizer(model)
        self.eval_dataset, self.engine, self.eval_scorer = eval_dataset, engine, eval_scorer
        self._eval_sets = None
        if eval_dataset is not None:
            self._eval_sets = trl_eval_sets(eval_dataset)  # a bad row is one line now, not after training
        elif config.evaluation_rule:
            raise ValueError(f"eval_strategy={config.eval_strategy!r} evaluates an eval_dataset during training: pass "
                             "eval_dataset")
        self.result: TrainResult | None = None
        self.state = TrainerState(max_steps=config.max_steps, logging_steps=config.logging_steps,
                                  save_steps=config.save_steps, log_history=[],
                                  is_world_process_zero=ProcessView().is_main_process)
        self.control = TrainerControl()
        self.callback_handler = _handler(list(callbacks or []), model, processing_class)
        self.hub = HubPush(args if args is not None else {}, config.output_dir)
        if self.hub.wanted and self.is_world_process_zero():  # a refused login fails now, as the Trainer's
            self.hub.create()
        self._event("on_init_end")

    def _event(self, name: str, **kwargs):
        self.control = getattr(self.callback_handler, name)(self.trl_args, self.state, self.control, **kwargs)

    def _on_step(self, step: int, record: dict) -> bool:
        """After each optimizer step (``sdft.train``'s ``step_callback``): state, log history and the
        callbacks; True when a callback asked the run to stop."""
        self.state.global_step = step
        self.state.epoch = record.get("epoch", self.state.epoch)
        self._event("on_step_end")
        if logs_step(step, self.args.logging_steps, self.args.logging_first_step):
            logs = {**train_scalars(record), "step": step}
            self.state.log_history.append(logs)
            self._event("on_log", logs=logs)
        if save_due(step, step == self.args.max_steps, self.args, len(self.examples), launched_size()):
            self._event("on_save")
        if self.control.should_training_stop:
            return True
        if step < self.args.max_steps:
            self._event("on_step_begin")
        return False

    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """As ``transformers.Trainer.train``: ``resume_from_checkpoint`` True (the newest intact checkpoint
        in output_dir) or a checkpoint path; None takes ``args.resume_from_checkpoint``."""
        config = self.args
        if resume_from_checkpoint not in (None, False):
            config = SDFTConfig.from_dict({**config.to_dict(), "resume_from_checkpoint": resume_from_checkpoint,
                                           "overwrite_output_dir": False})
        self.control = TrainerControl()
        self._event("on_train_begin")
        self._event("on_step_begin")
        t0 = time.perf_counter()
        during = config.evaluation_rule is not None  # the run evaluates eval_dataset as it goes
        try:
            self.result = train(self.model, self.examples, config, tokenizer=self.processing_class,
                                engine=self.engine, step_callback=self._on_step,
                                eval_scorer=self.eval_scorer if during else None,
                                eval_dataset=self._eval_sets if during else None,
                                eval_callback=self._on_evaluate if during else None)
        except OutputDirInUse as err:  # in the Trainer's terms: TRL's config has no overwrite_output_dir
            then = ("trainer.train(resume_from_checkpoint=True) continues that run; to start afresh, give a new "
                    "output_dir" if err.resumable else "give a new output_dir")
            raise ValueError(f"output_dir {err.out} {err.held}: {then} (sdft never trains over an earlier run's "
                             "work)") from None
        runtime = time.perf_counter() - t0
        self.model = self.result.model
        self.callback_handler.model = self.model
        losses = [r["loss"] for r in self.result.metrics]
        steps = len(self.result.metrics)
        metrics = {"train_runtime": runtime, "train_steps_per_second": steps / runtime if runtime else 0.0,
                   "train_samples_per_second": steps * config.per_device_train_batch_size
                   * config.gradient_accumulation_steps / runtime if runtime else 0.0,
                   "total_flos": 0.0, "train_loss": sum(losses) / len(losses) if losses else float("nan"),
                   "epoch": self.state.epoch}
        self.state.global_step = self.result.step
        if self.result.best_step is not None:  # load_best_model_at_end: the Trainer's record of its pick
            self.state.best_global_step = self.result.best_step
            picked = [r for r in self.result.evaluations if r["step"] == self.result.best_step]
            self.state.best_metric = picked[0][config.metric_for_best_model] if picked else None
        self.state.log_history.append({**metrics, "step": self.result.step})
        self._event("on_train_end")
        if self.hub.at_train_end:  # the Trainer's every_save push, whose last is the end of training
            self.push_to_hub(commit_message=f"Training in progress, step {self.result.step}")
        return TrainOutput(self.result.step, metrics["train_loss"], metrics)

    def _on_evaluate(self, step: int, record: dict):
        """An evaluation during training (eval_strategy='steps'): the log history and ``on_evaluate``, once
        per set (as the Trainer evaluates each of ``eval_dataset={name: ...}``), at the step evaluated."""
        self.state.global_step = step
        for name in eval_sets(self._eval_sets):
            keys = {k: f"{name}_{k}" if name else k for k in EVAL_KEYS}
            found = {k: record[key] for k, key in keys.items() if key in record}
            self._report_evaluation(found, f"eval_{name}" if name else "eval", step)

    def _report_evaluation(self, found: dict, prefix: str, step: int) -> dict:
        metrics = {f"{prefix}_{k}": found[k] for k in EVAL_KEYS if k in found}
        self.state.log_history.append({**metrics, "step": step})
        self._event("on_evaluate", metrics=metrics)
        return metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The held-out prompts answered greedily and scored against their demonstrations, and the
        demonstrations' perplexity: ``{prefix_score, prefix_perplexity, prefix_examples}``; for
        ``{name: dataset}``, each set's under ``prefix_name_``, as the Trainer names them. The held-out SDFT loss
        (``eval_loss``) is reported by the evaluations during training (``eval_strategy``), where the run's
        teacher is at hand, not here."""
        from sdft.data.chat import with_template_kwargs
        from sdft.eval.evaluation import evaluate

        sets = trl_eval_sets(eval_dataset) if eval_dataset is not None else self._eval_sets
        if sets is None:
            raise ValueError("evaluate() needs an eval_dataset (here or in the constructor)")
        model = self.model if not isinstance(self.model, (str, Path)) else None
        if model is None or self.processing_class is None:
            raise ValueError("evaluate() needs a loaded model and its processing_class: call train() first "
                             "or pass a model object")
        metrics = {}
        for name, examples in eval_sets(sets).items():
            tokenizer = with_template_kwargs(self.processing_class, self.args.chat_template_kwargs)  # as training
            found = evaluate(model, tokenizer, examples, self.eval_scorer, self.args.eval_tokens)
            prefix = f"{metric_key_prefix}_{name}" if name else metric_key_prefix
            metrics.update(self._report_evaluation(found, prefix, self.state.global_step))
        return metrics

    def is_world_process_zero(self) -> bool:
        return self.accelerator.is_main_process

    def is_local_process_zero(self) -> bool:
        return self.accelerator.is_local_main_process

    def add_callback(self, callback):
        """As ``Trainer.add_callback`` (a ``TrainerCallback`` class or instance). TRL's ``LogCompletionsCallback``
        is not added, with one line: it generates through the Trainer's accelerate internals to log completions to
        wandb or comet, a report that changes nothing in training (sdft's eval.json holds held-out answers)."""
        if _names(callback) == "LogCompletionsCallback":
            if self.is_world_process_zero():
                print("sdft: LogCompletionsCallback is not run (it generates through the Trainer's accelerate "
                      "internals); eval_dataset's answers are in eval.json", file=sys.stderr, flush=True)
            return
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        """As ``Trainer.pop_callback``: the callback (a class or an instance) removed and returned."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback):
        """As ``Trainer.remove_callback``."""
        self.callback_handler.remove_callback(callback)

    def log(self, logs: dict, start_time: float | None = None):
        """As ``Trainer.log``: ``logs`` (with the epoch) appended to ``state.log_history`` at the current step and
        given to the callbacks' ``on_log``; outside ``train()`` sdft's own reporters (metrics.jsonl, tensorboard,
        wandb) do not see it."""
        logs = {**logs, **({"epoch": self.state.epoch} if self.state.epoch is not None else {})}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._event("on_log", logs=logs)

    def log_metrics(self, split: str, metrics: dict):
        """As ``Trainer.log_metrics``: ``***** train metrics *****`` and the metrics, formatted, on process 0."""
        from transformers.trainer_pt_utils import log_metrics

        log_metrics(self, split, metrics)

    def metrics_format(self, metrics: dict) -> dict:
        import inspect

        from transformers.trainer_pt_utils import metrics_format

        if len(inspect.signature(metrics_format).parameters) == 2:  # transformers 4.x's takes the trainer first
            return metrics_format(self, metrics)
        return metrics_format(metrics)

    def save_metrics(self, split: str, metrics: dict, combined: bool = True):
        """As ``Trainer.save_metrics``: OUTPUT_DIR/{split}_results.json and, ``combined``, the metrics merged into
        OUTPUT_DIR/all_results.json, on process 0. Files of the user's script: sdft's run record does not list
        them, so no later run deletes them."""
        if not self.is_world_process_zero():
            return
        run_dir = Path(self.args.output_dir)
        files = [(run_dir / f"{split}_results.json", dict(metrics))]
        if combined:
            combined_path = run_dir / "all_results.json"
            try:
                earlier = json.loads(combined_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                earlier = {}
            files.append((combined_path, {**(earlier if isinstance(earlier, dict) else {}), **metrics}))
        for path, values in files:
            replace_file(path, json.dumps(values, indent=4, sort_keys=True))

    def save_state(self):
        """As ``Trainer.save_state``: the ``TrainerState`` (log history, steps, best pick) as
        OUTPUT_DIR/trainer_state.json, on process 0."""
        if self.is_world_process_zero():
            text = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
            replace_file(Path(self.args.output_dir) / "trainer_state.json", text)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **card):
        """As ``Trainer.push_to_hub``: the trained model (``save_model``'s OUTPUT_DIR/final_model, written again)
        and a model card (``card``: model_name, dataset_name, tags, language, license, finetuned_from) uploaded in
        one commit to ``hub_model_id``, created when missing, on process 0 (the others return None). Always
        blocking: returns the commit (``commit_url``). See ``sdft.integrations.hub_push``."""
        card = check_card(card)  # before the model is written
        folder = self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        return self.hub.push(folder, self.result.model, self.args, commit_message or "End of training", token=token,
                             revision=revision, private=private, card=card)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Write the trained model as a Hugging Face folder (LoRA: the adapter). Default: OUTPUT_DIR/final_model
        (TRL writes into output_dir itself, but sdft's run folder holds its own config.json, checkpoints and
        metrics, which a model folder written over it would destroy). ``save_model(args.output_dir)``, the
        last line of TRL's scripts, writes there too and says so."""
        from sdft.run.export import export_model
        from sdft.run.run_dir import FINAL_MODEL

        if self.result is None:
            raise ValueError("call train() before save_model()")
        run_dir = Path(self.args.output_dir)
        target = Path(output_dir or run_dir / FINAL_MODEL)
        if target.resolve() == run_dir.resolve():
            target = run_dir / FINAL_MODEL
            if self.accelerator.is_main_process:
                print(f"sdft: {run_dir} holds the run (checkpoints, metrics, sdft's config.json): the model goes "
                      f"to {target}; load it from there", file=sys.stderr, flush=True)
        if any(type(p).__name__ == "DTensor" for p in self.result.model.parameters()):
            written = run_dir / FINAL_MODEL
            if target == written and self.args.save_final_model:
                return target  # the run gathered the shards and wrote it at its end
            raise ValueError(f"under parallel=fsdp the model is sharded: its gathered copy is {written}, "
                             "written at the end of train() (save_final_model)")
        if not self.accelerator.is_main_process:  # one writer: process 0 (the others hold the same model)
            return target
        written = export_model(self.result.model, self.result.tokenizer, target, self.args.merge_lora)
        if self.hub.wanted and not _internal_call:  # as the Trainer's save_model
            self.push_to_hub(commit_message="Model save")
        return written
