"""Every field of TRL 1.16's ``SDFTConfig`` (with the ``TrainingArguments`` it inherits), classified once.

- ``HONOURED``: read by ``config_from_trl`` (the sdft key it maps to, or how).
- ``REFUSED``: sdft does not implement it; any value outside the listed "off" values is a one-line
  error naming the field, so nothing is ignored silently.
- ``IRRELEVANT``: accepted whatever its value, with the reason it changes nothing in an sdft run.

``tests/integrations/test_trl_dropin.py`` walks the installed TRL's dataclass: a field a future TRL adds fails that
test until it is classified here.
"""
from __future__ import annotations

from sdft.models.attention import IMPLEMENTATIONS
from sdft.runtime.distributed import launched_size

HONOURED = {
    "output_dir": "output_dir",
    "per_device_train_batch_size": "per_device_train_batch_size x num_generations (TRL counts completions)",
    "num_train_epochs": "max_steps, when max_steps is not set",
    "max_steps": "max_steps",
    "learning_rate": "learning_rate",
    "lr_scheduler_type": "lr_scheduler_type: every HF schedule that is a function of the step (not "
                         "reduce_lr_on_plateau or greedy, which follow an evaluation metric)",
    "lr_scheduler_kwargs": "lr_scheduler_kwargs, checked by transformers' scheduler when the trainer is built "
                           "(inverse_sqrt's too, which transformers 4.x's Trainer drops)",
    "warmup_steps": "warmup_steps (below 1: warmup_ratio, as transformers 5 reads it); none with lr_scheduler_type="
                    "'constant', as HF",
    "weight_decay": "weight_decay",
    "optim": "optim: adamw_torch / adamw_torch_fused are sdft's AdamW, others come from transformers' own factory "
             "(sdft.runtime.optimizer)",
    "optim_args": "optim_args",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_epsilon",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_grad_norm": "max_grad_norm (None or 0: no clipping, as the Trainer)",
    "bf16": "mixed_precision (True: bf16 autocast on fp32 master weights; None: auto)",
    "fp16": "mixed_precision=fp16 when True (fp16 autocast on fp32 master weights, dynamic loss scaling)",
    "activation_checkpointing": "gradient_checkpointing (transformers 5's name, when set)",
    "gradient_checkpointing": "gradient_checkpointing",
    "logging_steps": "logging_steps (a fraction of max_steps when below 1, as the Trainer)",
    "disable_tqdm": "progress_bar",
    "report_to": "report_to (none, tensorboard, wandb; others refused)",
    "save_strategy": "save_strategy: 'steps' (every save_steps and at the end), 'epoch' (at each pass's end and at "
                     "the end), 'best' (after each evaluation that beats the earlier ones) or 'no' (none)",
    "save_steps": "save_steps (a fraction of max_steps when below 1, as the Trainer)",
    "save_total_limit": "save_total_limit",
    "save_only_model": "save_only_model: checkpoints of the trainable weights alone (no resume from them, as HF)",
    "full_determinism": "full_determinism",
    "seed": "seed",
    "use_cpu": "device=cpu",
    "overwrite_output_dir": "overwrite_output_dir (transformers 4.x's field; gone in 5)",
    "resume_from_checkpoint": "resume_from_checkpoint (also train(resume_from_checkpoint=...))",
    "num_generations_eval": "num_generations_eval: rollouts per held-out prompt for eval_loss (the scored answers "
                            "are one greedy answer per prompt)",
    "project": "project (trackio's)",
    "trackio_space_id": "trackio_space_id",
    "push_to_hub": "the trained model folder and a model card pushed at the end of train() and on save_model "
                   "(sdft.integrations.hub_push)",
    "hub_model_id": "the repository push_to_hub creates or pushes to (default: output_dir's folder name)",
    "hub_private_repo": "a repository push_to_hub creates is private",
    "hub_token": "the token of push_to_hub",
    "hub_revision": "the branch push_to_hub pushes to (made when missing)",
    "hub_strategy": "every_save (pushed at the end of training and on save_model) or end (on save_model); "
                    "checkpoint folders are never pushed (checkpoint, all_checkpoints refused)",
    "model_init_kwargs": "dtype from its dtype / torch_dtype (float32, bfloat16), attn_implementation, revision (of a "
                         "Hub model named by its id); other keys "
                         "refused",
    "disable_dropout": "disable_dropout",
    "max_prompt_length": "max_prompt_length",
    "num_generations": "num_generations",
    "max_completion_length": "max_completion_length",
    "shuffle_dataset": "True: sdft's seeded shuffle each epoch; False refused",
    "temperature": "temperature",
    "top_k": "top_k (None or 0: off)",
    "top_p": "top_p",
    "min_p": "min_p (None: off)",
    "repetition_penalty": "repetition_penalty",
    "tf32": "tf32 (None: off; an Ampere or newer CUDA GPU, as in HF)",
    "logging_first_step": "logging_first_step: the first step is logged too",
    "data_seed": "data_seed (None: seed): the data order's seed alone",
    "chat_template_kwargs": "chat_template_kwargs: every chat of the run renders with them (TRL: its prompts)",
    "generation_kwargs": "its temperature / top_k / top_p / min_p / repetition_penalty override those fields, "
                         "as in TRL; other keys refused",
    "teacher_model_kind": "teacher_mode (base: frozen, live, ema)",
    "teacher_update_rate": "ema_decay = 1 - teacher_update_rate",
    "teacher_sync_steps": "teacher_sync_steps",
    "distillation_alpha": "divergence and distillation_alpha (0 forward KL, 1 reverse KL, between: JSD)",
    "distillation_mode": "distillation_mode",
    "distillation_topk": "distillation_topk",
    "distillation_add_tail": "distillation_add_tail",
    "generate_from_teacher": "generate_from_teacher",
    "teacher_prompt_template": "teacher_template ({privileged_context} -> {demonstration})",
    "num_loss_tokens_to_skip": "num_loss_tokens_to_skip",
    "train_sampling_strategy": "'random': sdft's seeded shuffle; others refused",
    "eval_strategy": "'steps' / 'epoch': eval_dataset answered and scored every eval_steps / at each pass's end "
                     "(and before training, and at the end); 'no': only evaluate()",
    "eval_steps": "eval_steps (a fraction of max_steps when below 1; not given: logging_steps, as HF)",
    "load_best_model_at_end": "load_best_model_at_end (needs eval_strategy='steps' or 'epoch' and an eval_dataset)",
    "metric_for_best_model": "metric_for_best_model: eval_score (default), eval_perplexity or eval_loss (the "
                             "held-out SDFT loss, the Trainer's default 'loss'; eval_NAME_score, ... for "
                             "eval_dataset={NAME: ...})",
    "steps_per_generation": "checked: rollouts sampled for several micro-steps of one optimizer step come from "
                            "the weights sdft samples each micro-step from (a divisor of gradient_accumulation_steps); "
                            "rollouts reused over optimizer steps are refused",
    "generation_batch_size": "checked as the steps_per_generation it gives (generation_batch_size / "
                             "(per_device_train_batch_size x processes))",
    "greater_is_better": "checked against metric_for_best_model's direction (score higher, perplexity lower)",
}

# field -> (values that mean "off", what sdft does not implement)
REFUSED = {
    "optim_target_modules": ((None,), "optimizer target modules (GaLore and the like)"),
    "label_smoothing_factor": ((0.0, 0), "label smoothing"),
    "torch_compile": ((False,), "torch.compile of the model"),
    "neftune_noise_alpha": ((None,), "NEFTune embedding noise"),
    "auto_find_batch_size": ((False,), "batch size search"),
    "logging_strategy": (("steps",), "logging other than every logging_steps"),
    "enable_jit_checkpoint": ((False,), "just-in-time checkpoints"),
    "accelerator_config": ((None, {}), "accelerate configuration (sdft runs its own DDP / FSDP2)"),
    "parallelism_config": ((None,), "accelerate parallelism (use SDFTConfig parallel=ddp|fsdp)"),
    "ddp_backend": ((None,), "a chosen DDP backend (sdft: gloo on CPU, nccl on CUDA)"),
    "fsdp": ((None, "", []), "transformers' FSDP (use SDFTConfig parallel=fsdp: FSDP2)"),
    "fsdp_config": ((None, {}), "transformers' FSDP (use SDFTConfig parallel=fsdp: FSDP2)"),
    "deepspeed": ((None,), "DeepSpeed (use SDFTConfig parallel=fsdp)"),
    "trust_remote_code": ((False,), "remote model code (sdft never runs it)"),
    "cache_implementation": ((None,), "another KV cache implementation"),
    "gradient_checkpointing_kwargs": ((None, {}, {"use_reentrant": False}),
                                      "gradient checkpointing arguments other than sdft's use_reentrant=False"),
    "activation_checkpointing_kwargs": ((None, {}, {"use_reentrant": False}),
                                        "activation checkpointing arguments other than sdft's use_reentrant=False"),
    "use_vllm": ((False,), "vLLM generation (pass a rollout engine: SDFTTrainer(..., engine=...))"),
    "use_teacher_server": ((False,), "a teacher server"),
    "num_iterations": ((1,), "reusing rollouts over several optimizer iterations"),
    # transformers 4.x's TrainingArguments only (TRL 1.16 runs on 4.56.2 and newer)
    "per_gpu_train_batch_size": ((None,), "the deprecated per_gpu_train_batch_size (use per_device_train_batch_size)"),
    "use_mps_device": ((False,), "Apple's MPS device"),
    "jit_mode_eval": ((False,), "TorchScript evaluation"),
    "use_ipex": ((False,), "Intel's extension for PyTorch"),
    "half_precision_backend": (("auto",), "a half-precision backend other than torch's autocast"),
    "fp16_backend": (("auto",), "a half-precision backend other than torch's autocast"),
    "tpu_num_cores": ((None,), "TPUs"),
    "tpu_metrics_debug": ((False,), "TPU metrics"),
    "past_index": ((-1,), "feeding a model output back as the next step's input (past_index)"),
    "fsdp_min_num_params": ((0,), "transformers' FSDP (use SDFTConfig parallel=fsdp: FSDP2)"),
    "fsdp_transformer_layer_cls_to_wrap": ((None,), "transformers' FSDP (use SDFTConfig parallel=fsdp: FSDP2)"),
    "save_safetensors": ((True,), "checkpoints other than safetensors models (final_model is safetensors)"),
}

IRRELEVANT = {
    "average_tokens_across_devices": "sdft always divides by the whole step's tokens or rollouts over all processes",
    "bf16_full_eval": "sdft evaluates in the run's own precision; there is no separate evaluation dtype",
    "fp16_full_eval": "sdft evaluates in the run's own precision; there is no separate evaluation dtype",
    "eval_on_start": "with eval_strategy='steps' sdft also evaluates before training (eval.json's first line)",
    "torch_compile_backend": "only read with torch_compile, which is refused",
    "torch_compile_mode": "only read with torch_compile, which is refused",
    "use_liger_kernel": "sdft's loss is always fused with the LM head (no [tokens x vocab] logits), what liger's "
                        "fused JSD gives TRL; the model's own layers are not swapped for liger's",
    "liger_kernel_config": "only read with use_liger_kernel, which changes nothing in sdft (see there)",
    "use_cache": "sdft's decoding always uses the KV cache, its scoring passes never",
    "torch_empty_cache_steps": "sdft frees rollout and activation memory itself each step",
    "log_on_each_node": "process 0 alone writes metrics",
    "logging_nan_inf_filter": "a non-finite loss stops the run (nonfinite=stop) or skips the step, never logged",
    "include_num_input_tokens_seen": "metrics.jsonl logs the tokens of every step",
    "log_level": "verbosity of transformers' logger, which sdft's loop does not use",
    "log_level_replica": "verbosity of transformers' logger, which sdft's loop does not use",
    "run_name": "a wandb run's name: set WANDB_NAME",
    "trackio_bucket_id": "trackio's storage bucket on the Hub: sdft's trackio keeps its local store",
    "trackio_static_space_id": "a static trackio Space: sdft's trackio logs locally or to trackio_space_id",
    "eval_delay": "sdft evaluates from the start at every eval_steps",
    "per_device_eval_batch_size": "sdft answers the held-out prompts greedily in its own batches",
    "prediction_loss_only": "sdft's evaluation scores greedy answers; it computes no held-out loss",
    "eval_do_concat_batches": "sdft's evaluation scores greedy answers; it keeps no prediction tensors",
    "eval_use_gather_object": "process 0 alone evaluates (under FSDP2 every process helps generate)",
    "eval_accumulation_steps": "sdft's evaluation scores greedy answers; it keeps no prediction tensors",
    "include_for_metrics": "sdft's evaluation scores greedy answers with eval_scorer",
    "batch_eval_metrics": "sdft's evaluation scores greedy answers with eval_scorer",
    "save_on_each_node": "process 0 alone writes checkpoints (full tensors, readable by any process count)",
    "hub_always_push": "sdft's pushes wait for each other (none is skipped while another uploads)",
    "ignore_data_skip": "a resume recomputes the data order from the step, nothing is skipped or replayed",
    "restore_callback_states_from_checkpoint": "sdft's loop has no callbacks whose state it could restore",
    "dataloader_drop_last": "rows are read into memory, not through a DataLoader",
    "dataloader_num_workers": "rows are read into memory, not through a DataLoader",
    "dataloader_pin_memory": "rows are read into memory, not through a DataLoader",
    "dataloader_persistent_workers": "rows are read into memory, not through a DataLoader",
    "dataloader_prefetch_factor": "rows are read into memory, not through a DataLoader",
    "dataloader_multiprocessing_context": "rows are read into memory, not through a DataLoader",
    "dataloader_in_order": "rows are read into memory, not through a DataLoader",
    "remove_unused_columns": "sdft reads prompt and privileged_context by name and ignores other columns",
    "label_names": "sdft's loss has no labels column",
    "length_column_name": "only read for length-grouped sampling, which TRL's SDFT does not use",
    "ddp_find_unused_parameters": "sdft's DDP wraps one module whose forward uses every trainable parameter",
    "ddp_bucket_cap_mb": "sdft's DDP wrapper keeps torch's bucket size",
    "ddp_broadcast_buffers": "sdft's DDP wrapper never broadcasts buffers (no buffer changes in training)",
    "ddp_static_graph": "sdft's DDP wrapper keeps torch's default",
    "ddp_timeout": "torch's default process-group timeout",
    "debug": "transformers' debug switches (TPU metrics, underflow detection) for its own loop",
    "skip_memory_metrics": "metrics.jsonl always logs peak memory",
    "do_train": "a script flag the Trainer itself ignores",
    "do_eval": "a script flag the Trainer itself ignores",
    "do_predict": "a script flag the Trainer itself ignores",
    "local_rank": "the rank comes from the launcher's environment (RANK, LOCAL_RANK)",
    "ds3_gather_for_generation": "only read with DeepSpeed ZeRO-3, which is refused",
    "vllm_mode": "only read with use_vllm, which is refused",
    "vllm_model_impl": "only read with use_vllm, which is refused",
    "vllm_enable_sleep_mode": "only read with use_vllm, which is refused",
    "vllm_server_base_url": "only read with use_vllm, which is refused",
    "vllm_server_host": "only read with use_vllm, which is refused",
    "vllm_server_port": "only read with use_vllm, which is refused",
    "vllm_group_port": "only read with use_vllm, which is refused",
    "vllm_server_timeout": "only read with use_vllm, which is refused",
    "vllm_tensor_parallel_size": "only read with use_vllm, which is refused",
    "vllm_gpu_memory_utilization": "only read with use_vllm, which is refused",
    "vllm_max_model_length": "only read with use_vllm, which is refused",
    "distillation_is_clip": "TRL applies it to reused rollouts only; sdft never reuses them (num_iterations=1)",
    "warmup_ratio": "older transformers' field, read as warmup_ratio when present (warmup_steps overrides it)",
    # transformers 4.x's TrainingArguments only: folded by its __post_init__ into a field classified above, or
    # about a part of the HF Trainer that sdft does not run
    "no_cuda": "TrainingArguments copies it into use_cpu (honoured)",
    "adafactor": "TrainingArguments turns True into optim='adafactor' (honoured)",
    "torchdynamo": "TrainingArguments turns it into torch_compile (refused)",
    "push_to_hub_model_id": "TrainingArguments folds it into hub_model_id (honoured)",
    "push_to_hub_organization": "TrainingArguments folds it into hub_model_id (honoured)",
    "push_to_hub_token": "TrainingArguments copies it into hub_token (honoured)",
    "per_gpu_eval_batch_size": "sdft answers the held-out prompts greedily in its own batches",
    "logging_dir": "report_to=tensorboard writes under output_dir/runs, as transformers 5 (which has no logging_dir)",
    "fp16_opt_level": "apex's; sdft's fp16 is torch's autocast",
    "group_by_length": "sdft packs each step's rollouts into one prefix tree: no padding for length groups to save",
    "use_legacy_prediction_loop": "sdft's evaluation is its own, not the Trainer's prediction loop",
    "include_inputs_for_metrics": "sdft's evaluation is its own, not the Trainer's compute_metrics",
    "include_tokens_per_second": "sdft logs tokens_per_s with every step",
    "ray_scope": "for the Trainer's Ray hyperparameter search, which sdft does not run",
    "mp_parameters": "SageMaker's model-parallel arguments, which sdft does not read",
    "_n_gpu": "the Trainer's own GPU count; sdft places one process per device",
}

REPORTERS = ("none", "tensorboard", "wandb", "trackio")


def arg(args, name, default=None):
    """A TRL field's value from a config object, a namespace or a dict."""
    return args.get(name, default) if isinstance(args, dict) else getattr(args, name, default)


def plain(x):
    """Enum members (TRL's SchedulerType, IntervalStrategy, ...) as their plain value."""
    return getattr(x, "value", x)


def _defaults(args) -> dict:
    """A TRL config object's fields as its class sets them when nothing is asked (its ``__post_init__``
    turns some "off" values into objects, e.g. ``accelerator_config``); {} for dicts and namespaces."""
    import dataclasses
    import warnings

    if not dataclasses.is_dataclass(args):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = type(args)(output_dir=getattr(args, "output_dir", None), use_cpu=getattr(args, "use_cpu", False))
    return {f.name: getattr(fresh, f.name) for f in dataclasses.fields(fresh)}


def steps_per_generation(args) -> int:
    """The micro-steps one TRL generation serves: ``steps_per_generation``, or as ``__post_init__`` derives it
    from ``generation_batch_size`` (completions over all processes), or ``gradient_accumulation_steps``."""
    given = arg(args, "steps_per_generation", None)
    if given is not None:
        return int(given)
    batch = arg(args, "generation_batch_size", None)
    if batch is None:
        return int(arg(args, "gradient_accumulation_steps", 1))
    per_step = int(arg(args, "per_device_train_batch_size", 8)) * launched_size()
    if int(batch) % per_step:
        raise ValueError(f"generation_batch_size={batch}: not a whole number of micro-steps of {per_step} "
                         "completions (per_device_train_batch_size x processes), as TRL requires")
    return int(batch) // per_step


def check_generation_batch(args) -> None:
    """Generations that serve several micro-steps of one optimizer step sample from the same weights as
    sdft's rollouts each micro-step; generations reused over optimizer steps (off-policy) are refused."""
    steps, accumulation = steps_per_generation(args), int(arg(args, "gradient_accumulation_steps", 1))
    if steps < 1 or accumulation % steps:
        given = [f"{name}={arg(args, name)!r}" for name in ("steps_per_generation", "generation_batch_size")
                 if arg(args, name, None) is not None]  # TRL's __post_init__ fills in the other: both are named
        raise ValueError(f"{' and '.join(given)}: one generation would serve {steps} micro-steps, "
                         f"across optimizer steps of gradient_accumulation_steps={accumulation} (rollouts reused "
                         "off-policy), which sdft does not implement; set steps_per_generation to a divisor of "
                         "gradient_accumulation_steps, or leave both unset")


HUB_STRATEGIES = ("every_save", "end")


def check_strategy(args) -> None:
    """``hub_strategy``: what sdft pushes (``sdft.integrations.hub_push``) is the trained model, never checkpoints."""
    strategy = plain(arg(args, "hub_strategy", "every_save"))
    if strategy not in HUB_STRATEGIES:
        raise ValueError(f"hub_strategy={strategy!r}: sdft pushes the trained model (every_save: at the end of "
                         "training and on save_model; end: on save_model and push_to_hub), never checkpoint folders")


def check_fields(args) -> None:
    """One-line error for the first TRL field set to something sdft does not implement."""
    defaults = _defaults(args)
    check_generation_batch(args)
    check_strategy(args)
    for name, (off, what) in REFUSED.items():
        value = plain(arg(args, name, off[0]))
        if value not in off and not (name in defaults and value == plain(defaults[name])):
            raise ValueError(f"{name}={value!r}: sdft does not implement {what}; set {name}={off[0]!r}")
    checks = [
        (
            "save_strategy",
            plain(arg(args, "save_strategy", "steps")) in ("steps", "epoch", "best", "no"),
            "sdft checkpoints every save_steps ('steps') or epoch ('epoch') and at the end, after a best evaluation "
            "('best'), or never ('no')",
        ),
        ("shuffle_dataset", arg(args, "shuffle_dataset", True) is not False, "sdft always shuffles, seeded per epoch"),
        (
            "train_sampling_strategy",
            plain(arg(args, "train_sampling_strategy", "random")) == "random",
            "sdft samples in a seeded shuffle",
        ),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ValueError(f"{name}={plain(arg(args, name))!r}: {why}")
    report = arg(args, "report_to", None) or []
    for r in [report] if isinstance(report, str) else list(report):
        if r not in REPORTERS:
            raise ValueError(f"report_to={r!r}: sdft logs to {', '.join(REPORTERS)}")
    kwargs = arg(args, "model_init_kwargs", None) or {}
    unknown = sorted(set(kwargs) - {"dtype", "torch_dtype", "attn_implementation", "revision", "trust_remote_code"})
    if unknown:
        raise ValueError(f"model_init_kwargs {unknown[0]!r}: sdft loads the model itself and reads only its dtype, "
                         "attn_implementation and revision")
    if kwargs.get("trust_remote_code"):
        raise ValueError("model_init_kwargs trust_remote_code=True: sdft never runs a model repository's code; "
                         "set it to False")


def model_revision(args) -> str | None:
    """``model_init_kwargs``' revision (a branch, tag or commit of a Hub model; None: its main branch)."""
    revision = (arg(args, "model_init_kwargs", None) or {}).get("revision")
    return None if revision in (None, "") else str(revision)


def model_init_values(args) -> dict:
    """``model_init_kwargs`` as sdft's ``dtype`` (float32 / bfloat16; float32 when not given) and
    ``attn_implementation`` (auto when not given)."""
    kwargs = arg(args, "model_init_kwargs", None) or {}
    value = kwargs.get("dtype", kwargs.get("torch_dtype"))
    name = "float32" if value is None or value == "auto" else str(value).replace("torch.", "")
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"model_init_kwargs dtype={value!r}: sdft loads float32 or bfloat16 weights")
    attention = kwargs.get("attn_implementation") or "auto"
    if attention not in IMPLEMENTATIONS:
        hub = " (hub kernels are not fetched: install flash-attn for flash_attention_2)" if "/" in attention else ""
        raise ValueError(f"model_init_kwargs attn_implementation={attention!r}: sdft runs "
                         f"{', '.join(IMPLEMENTATIONS[1:])}{hub}")
    return {"dtype": name, "attn_implementation": attention}
