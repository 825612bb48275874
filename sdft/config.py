"""SDFTConfig: every knob of a run, typed, documented and validated when it is built.

Names follow TRL's SDFTConfig where they mean the same. Each field carries a one-line ``help`` in its
metadata; ``sdft train --help`` and ``sdft config --show`` are generated from it, so they cannot drift.
Validation (types, ranges, choices) runs in ``__post_init__``: a bad value is a one-line ``ValueError``
before any model loads, for the API and the CLI alike.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields

from sdft.data.chat import checked_template_kwargs, json_mapping, parse_template_kwargs
from sdft.data.examples import check_column_map
from sdft.data.templates import check_template
from sdft.eval.scorers import get_scorer
from sdft.models.attention import FLASH, IMPLEMENTATIONS
from sdft.prefix.attention import MODES as TREE_ATTENTION_MODES
from sdft.runtime.inference import DEVICE_PATTERN
from sdft.runtime.optimizer import ADAMW, OptimizerSettings
from sdft_kernels import IS_LEVELS, TOPK_SUPPORTS
from sdft_kernels.divergence import DIVERGENCES, make_spec

TEACHER_MODES = ("live", "frozen", "ema")
LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_min_lr", "constant_with_warmup", "cosine_with_restarts",
                "polynomial", "inverse_sqrt", "cosine_warmup_with_min_lr", "warmup_stable_decay")
# (HF's schedules that are functions of the step, run by sdft.run.schedule; reduce_lr_on_plateau and greedy follow
# an evaluation metric)
DISTILLATION_MODES = ("full_logits", "topk_logits", "sampled_token")
LOSS_NORMALIZATIONS = ("token_mean", "sequence_mean")
MODE_ALIASES = {"full": "full_logits", "topk": "topk_logits"}
NONFINITE_ACTIONS = ("stop", "skip")
REPORT_BACKENDS = ("none", "tensorboard", "wandb", "trackio")  # sdft.run.reporting writes each
PATH_FIELDS = ("output_dir", "eval_data", "retention_data", "retention_text", "resume_from_checkpoint")


def _template_from_trl(template: str) -> str:
    return template.replace("{privileged_context}", "{demonstration}")


def _teacher_mode_from_trl(kind: str) -> str:
    modes = {"base": "frozen", "live": "live", "ema": "ema"}
    if kind not in modes:
        raise ValueError(f"unknown teacher_model_kind {kind!r}; expected one of base, live, ema")
    return modes[kind]


# TRL's SDFTConfig names accepted by from_dict / from_strings (and so by the CLI): name -> (our field,
# how to parse CLI text, how to convert the value).
TRL_ALIASES = {
    "teacher_model_kind": ("teacher_mode", str, _teacher_mode_from_trl),
    "teacher_update_rate": ("ema_decay", float, lambda rate: 1.0 - rate),
    "teacher_prompt_template": ("teacher_template", str, _template_from_trl),
}


# names users bring from the HF Trainer (and TRL, torchtune) that sdft spells otherwise: name -> what to set here
_STEPS = "max_steps, in optimizer steps; `sdft train --dry-run` says how many passes over the rows they make"
SPELLED_OTHERWISE = {
    "num_train_epochs": _STEPS,
    "epochs": _STEPS,
    "bf16": "mixed_precision=bf16",
    "fp16": "mixed_precision=fp16",
    "torch_dtype": "dtype",
    "model_name_or_path": "the --model argument",
    "dataset_name": "the --data argument",
    "beta": "divergence=jsd distillation_alpha (GKD's beta)",
}


def unknown_options(unknown: list[str], known) -> str:
    """One line naming the options SDFTConfig lacks, each with the name it likely meant."""
    import difflib

    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
        hint = SPELLED_OTHERWISE.get(name) or (close[0] if close else None)
        named.append(f"{name} (here: {hint})" if hint else name)
    return f"unknown SDFTConfig option(s): {', '.join(named)}; `sdft train --help` lists them all"


def _translate_aliases(values: dict, text: bool = False) -> dict:
    """Replace TRL's names by ours (CLI text parsed first when ``text``); both given is an error."""
    out = dict(values)
    for alias, (target, parse, convert) in TRL_ALIASES.items():
        if alias not in out:
            continue
        if target in values:
            raise ValueError(f"give {target} or its TRL name {alias}, not both")
        value = out.pop(alias)
        if text:
            try:
                value = parse(value)
            except ValueError:
                raise ValueError(f"{alias} must be a {parse.__name__}, got {value!r}") from None
        out[target] = convert(value)
    return out


def _opt(default, help: str, *, choices=None, minimum=None, positive=False, below=None, kind=None, pattern=None):
    """A config field with its one-line help and range (``pattern``: (regex, what it names), values it takes
    beside ``choices``); a list default gets a factory."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "positive": positive, "below": below,
            "kind": kind, "pattern": pattern}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SDFTConfig:
    output_dir: str = _opt("sdft-output", "folder for checkpoints, metrics.jsonl and the resolved config")
    # Optimisation
    learning_rate: float = _opt(1e-5, "peak learning rate of the optimizer", positive=True)
    weight_decay: float = _opt(0.0, "weight decay, not on biases and norms (as the HF Trainer and TRL)",
                               minimum=0.0)
    optim: str = _opt("adamw_torch_fused", "the optimizer by its HF Trainer name: adamw_torch_fused / adamw_torch "
                      "(sdft's AdamW, fused where torch has it), or any other transformers builds (adafactor, sgd, "
                      "rmsprop, adamw_8bit and paged_adamw_8bit with bitsandbytes, ...), one process or DDP")
    optim_args: str = _opt("", "keywords of a non-AdamW optim as HF's optim_args, e.g. momentum=0.9 for sgd",
                           kind="optional")
    adam_beta1: float = _opt(0.9, "AdamW's beta1 (HF's adam_beta1)", minimum=0.0, below=1.0)
    adam_beta2: float = _opt(0.999, "AdamW's beta2 (HF's adam_beta2)", minimum=0.0, below=1.0)
    adam_epsilon: float = _opt(1e-8, "AdamW's epsilon (HF's adam_epsilon)", positive=True)
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this value (0: no clipping, the norm still "
                                     "logged, as the HF Trainer)", minimum=0)
    max_steps: int = _opt(40, "optimizer steps in the run", positive=True)
    per_device_train_batch_size: int = _opt(2, "prompts per micro-step", positive=True)
    gradient_accumulation_steps: int = _opt(1, "micro-steps per optimizer step", positive=True)
    seed: int = _opt(0, "seed for data order, rollouts and initialisation", minimum=0)
    data_seed: int = _opt(-1, "seed of the data order alone (-1: seed), HF's data_seed", minimum=-1)
    full_determinism: bool = _opt(False, "as transformers' full_determinism: deterministic torch algorithms "
                                  "(torch.use_deterministic_algorithms, cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG) "
                                  "for the run; costs GPU speed, nothing measurable on CPU (sdft.runtime.determinism)")
    tf32: bool = _opt(False, "TF32 for fp32 matrix products and convolutions on an Ampere or newer CUDA GPU "
                      "(torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32) for the run, as HF's tf32, "
                      "the fused loss's Triton kernels included; what it rounds: 10 bits of mantissa in the "
                      "products' inputs")
    decode_gemm: str = _opt("rule", "layout of decoding's few-row CPU matrix products: rule (fixed by the row "
                            "count: a seed gives the same rollouts under any load), auto (timed per process: can "
                            "be faster on another CPU, but a busy machine can change the numbers), off (F.linear)",
                            choices=("rule", "auto", "off"))
    lr_scheduler_type: str = _opt("constant", "learning-rate schedule over max_steps, after the warmup: each step's "
                                  "rate is the HF Trainer's for the same name (constant keeps the warmup, as HF's "
                                  "constant_with_warmup)", choices=LR_SCHEDULES)
    lr_scheduler_kwargs: dict = _opt({}, "the schedule's own keywords as JSON, as HF's lr_scheduler_kwargs, e.g. "
                                     "{\"num_cycles\": 2} (cosine_with_restarts), {\"power\": 2.0} (polynomial), "
                                     "{\"num_decay_steps\": 10} (warmup_stable_decay)", kind="kwargs")
    min_lr_rate: float = _opt(0.0, "cosine_with_min_lr (and cosine_warmup_with_min_lr): the share of learning_rate "
                              "the cosine ends at (HF's lr_scheduler_kwargs min_lr_rate)", minimum=0.0, below=1.0)
    warmup_ratio: float = _opt(0.0, "share of max_steps with a linear warmup from 0 (rounded up to whole steps, "
                               "as HF)", minimum=0.0, below=1.0)
    warmup_steps: int = _opt(0, "optimizer steps of linear warmup from 0 (HF's warmup_steps), instead of "
                             "warmup_ratio", minimum=0)
    gradient_checkpointing: bool = _opt(False, "recompute decoder activations in backward: less memory, "
                                        "about one more student forward of time (TRL's default is on)")
    # Rollouts (student samples on-policy)
    num_generations: int = _opt(4, "G: sampled rollouts per prompt", positive=True)
    num_generations_eval: int = _opt(0, "rollouts per held-out prompt for the held-out loss (0: num_generations; "
                                     "TRL's num_generations_eval): fewer makes each evaluation cheaper", minimum=0)
    temperature: float = _opt(1.0, "sampling temperature of the rollouts", positive=True)
    top_k: int = _opt(0, "rollouts sample from the top_k most likely tokens (0: all; TRL's top_k)", minimum=0)
    top_p: float = _opt(1.0, "rollouts sample from the smallest set of tokens whose probability reaches top_p "
                        "(1: all; TRL's top_p)", positive=True)
    min_p: float = _opt(0.0, "rollouts drop tokens below min_p x the most likely token's probability (0: none; "
                        "TRL's min_p)", minimum=0.0, below=1.0)
    repetition_penalty: float = _opt(1.0, "rollouts divide the logits of tokens their sequence already holds by "
                                     "this (multiply when negative; 1: off; TRL's repetition_penalty)", positive=True)
    chat_template_kwargs: dict = _opt({}, "extra variables for the tokenizer's chat template, as JSON, e.g. "
                                      "{\"enable_thinking\": false} for Qwen3 (TRL's chat_template_kwargs): every "
                                      "prompt, teacher context, demonstration and evaluation of the run renders with "
                                      "them")
    max_prompt_length: int = _opt(512, "longest prompt / teacher context in tokens (longer is an error)",
                                  positive=True)
    max_completion_length: int = _opt(48, "longest rollout in tokens", positive=True)
    # Distillation loss
    divergence: str = _opt("reverse_kl", "per-token divergence student vs teacher", choices=DIVERGENCES)
    distillation_alpha: float = _opt(0.5, "jsd beta (TRL's name): 0 forward KL, 1 reverse KL", minimum=0.0)
    distillation_temperature: float = _opt(1.0, "logits are divided by this before the divergence",
                                           positive=True)
    distillation_mode: str = _opt("full_logits", "full_logits: the whole vocabulary (the paper); topk_logits: "
                                  "on distillation_topk ids (TRL's default); sampled_token: reverse-KL estimator "
                                  "on the sampled ids (TRL)", choices=DISTILLATION_MODES)
    distillation_topk: int = _opt(100, "topk_logits: size of the support", positive=True)
    distillation_topk_support: str = _opt("student", "topk_logits: whose top-k ids form the support (TRL: "
                                          "student; tinker: teacher)", choices=TOPK_SUPPORTS)
    distillation_add_tail: bool = _opt(False, "topk_logits: add one bucket for the mass outside the support "
                                       "instead of renormalising")
    distillation_is_clip: float | None = _opt(None, "importance-sampling correction against the rollout-time "
                                              "log-probs, capped at this (none: off)", positive=True,
                                              kind="optional_float")
    distillation_is_level: str = _opt("token", "token: ratio per token (TRL); sequence: mean ratio of the "
                                      "sequence (the paper)", choices=IS_LEVELS)
    num_loss_tokens_to_skip: int = _opt(0, "leave the first N completion tokens out of the loss (paper: 3)",
                                        minimum=0)
    loss_normalization: str = _opt("token_mean", "token_mean: every scored token weighs the same; "
                                   "sequence_mean: mean over each rollout's tokens, then over rollouts (TRL, "
                                   "the paper)", choices=LOSS_NORMALIZATIONS)
    # Teacher
    teacher_mode: str = _opt("frozen", "frozen: initial weights (LoRA: adapters off); live: current weights; "
                             "ema: moving average of the student", choices=TEACHER_MODES)
    ema_decay: float = _opt(0.99, "ema teacher: phi <- decay*phi + (1-decay)*theta each step", minimum=0.0,
                            below=1.0)
    teacher_template: str = _opt("fewshot", "fewshot | paper | a format string with {prompt} and "
                                 "{demonstration}")
    teacher_sync_steps: int = _opt(1, "ema teacher: update it every this many optimizer steps", positive=True)
    generate_from_teacher: bool = _opt(False, "sample the rollouts from the teacher context (prompt + "
                                       "demonstration) instead of the prompt (TRL's option)")
    share_prefix: bool = _opt(True, "compute each prompt / teacher context once per G rollouts")
    tree_attention: str = _opt("auto", "attention of the prefix-tree passes: auto (FlexAttention block mask on CUDA "
                               "for packed rows of 1024+ tokens, the dense mask elsewhere), dense (a [T, T] mask "
                               "through sdpa/eager), flex (the block mask wherever it runs: on CPU only the "
                               "passes without gradient); see sdft.prefix.attention", choices=TREE_ATTENTION_MODES)
    attn_implementation: str = _opt("auto", "the model's attention: auto (the model's own; sdpa for what sdft "
                                    "loads), sdpa, eager, or flash_attention_2 (the flash-attn package, CUDA, bf16: "
                                    "no prefix tree there, prompts are shared through the KV cache and every pass "
                                    "runs flash-attn's varlen kernels); see sdft.models.attention",
                                    choices=IMPLEMENTATIONS)
    share_teacher_prefix: bool = _opt(False, "live teacher: score prompts and teacher contexts in ONE prefix tree "
                                      "where the node count says it pays (their common system message computed "
                                      "once). Off by default: at long prompts on the CPU it cut token passes 39% "
                                      "but was no faster and took 16% more memory (trl_step_live_cpu.md)")
    # LoRA (via peft)
    use_lora: bool = _opt(False, "train LoRA adapters instead of all weights")
    lora_r: int = _opt(16, "LoRA rank", positive=True)
    lora_alpha: int = _opt(32, "LoRA scaling alpha", positive=True)
    lora_dropout: float = _opt(0.0, "LoRA dropout", minimum=0.0, below=1.0)
    lora_target_modules: list[str] = _opt(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get adapters (comma-separated on the CLI); "
        "all-linear: every linear layer but the head; auto: peft's default for the model's family")
    # Bookkeeping
    logging_steps: int = _opt(1, "write metrics.jsonl every this many steps", positive=True)
    logging_first_step: bool = _opt(False, "also write the first step (HF's logging_first_step)")
    save_strategy: str = _opt("steps", "when checkpoints are written: steps (every save_steps and at the end) | "
                              "epoch (at the end of each pass over the training rows, and at the end) | no (never, "
                              "as HF's: nothing to resume after a crash or Ctrl-C; final_model is still written) | "
                              "best (after each evaluation during training that beats every earlier one by "
                              "metric_for_best_model, as HF's)", choices=("steps", "epoch", "no", "best"))
    save_steps: int = _opt(20, "write a checkpoint every this many steps (and at the end)", positive=True)
    save_only_model: bool = _opt(False, "checkpoints hold the trainable weights alone, without the optimizer and "
                                 "RNG states (or an EMA teacher), as HF's save_only_model: a full fine-tune's take "
                                 "about a third of the disk, but no run resumes from them (sdft export reads them)")
    save_total_limit: int = _opt(2, "keep this many newest checkpoints (0: keep all)", minimum=0)
    resume_from_checkpoint: bool | str = _opt(
        False, "true: continue from the newest intact checkpoint in output_dir; or a checkpoint path",
        kind="resume")
    overwrite_output_dir: bool = _opt(False, "start afresh in an output_dir that holds checkpoints "
                                      "(deletes only what sdft wrote there: the entries .sdft-run.json lists)")
    nonfinite: str = _opt("stop", "on a non-finite loss or gradient norm: stop the run, or skip the step",
                          choices=NONFINITE_ACTIONS)
    save_final_model: bool = _opt(True, "at the end write output_dir/final_model, a Hugging Face folder "
                                  "(LoRA: the peft adapter)")
    merge_lora: bool = _opt(False, "LoRA: final_model (and sdft export) hold the merged full model instead")
    report_to: list[str] = _opt(["none"], "also log to: none | tensorboard | wandb (offline unless WANDB_MODE "
                                "says otherwise) | trackio (local unless trackio_space_id), comma-separated; TRL's "
                                "metric names")
    project: str = _opt("sdft", "trackio's project (TRL's project)")
    trackio_space_id: str = _opt("", "a Hugging Face Space trackio also sends the metrics to (TRL's trackio_space_id; "
                                 "empty: local only)", kind="optional")
    column_map: dict = _opt({}, "the dataset's column for each column sdft reads, as JSON (torchtune's column_map), "
                            "e.g. {\"prompt\": \"question\", \"demonstration\": \"answer\"}: applied to the training "
                            "and held-out data", kind="kwargs")
    # Evaluation on the user's held-out data
    eval_data: str = _opt("", "held-out prompt + demonstration rows (a file, or a Hub id ORG/NAME[:CONFIG][:SPLIT], "
                          "split test): greedy answers scored before and after training (output_dir/eval.json)",
                          kind="optional")
    eval_scorer: str = _opt("exact", "exact | normalized | json | regex:PATTERN (first match, or its group 1, "
                            "equal in answer and demonstration)")
    retention_data: str = _opt("auto", "prompt + demonstration rows (as eval_data) the model must keep answering, "
                               "scored with every evaluation (retention_score in eval.json and the loggers); auto: the "
                               "bundled general probe for the embedded model when eval_data is set; empty: off",
                               kind="optional")
    retention_text: str = _opt("auto", "plain text (paragraphs, blank-line separated) whose perplexity must not rise, "
                               "scored with every evaluation; auto: bundled paragraphs for the embedded model when "
                               "eval_data is set; empty: off", kind="optional")
    retention_scorer: str = _opt("contains", "scorer of retention_data: exact | normalized | json | contains "
                                 "(a |-separated alternative of the demonstration as a whole word) | regex:PATTERN")
    eval_steps: int = _opt(0, "also evaluate every this many steps (0: before and after only)", minimum=0)
    eval_strategy: str = _opt("steps", "when the run also evaluates as it trains: steps (every eval_steps) | epoch "
                              "(at the end of each pass over the training rows, as HF's)", choices=("steps", "epoch"))
    eval_max_new_tokens: int = _opt(0, "tokens a greedy evaluation answer may take (0: max_completion_length)",
                                    minimum=0)
    load_best_model_at_end: bool = _opt(False, "end the run on the weights of its best evaluation on eval_data "
                                        "(before training, every eval_steps, the last step; the earliest on ties), "
                                        "kept in output_dir/best_weights.pt: the returned model and final_model "
                                        "hold them (HF's load_best_model_at_end)")
    metric_for_best_model: str = _opt("score", "what load_best_model_at_end and save_strategy=best rank: score or "
                                      "retention_score (higher is better), perplexity, loss (the held-out loss, "
                                      "TRL's eval_loss) or retention_text_perplexity (lower is better)",
                                      choices=("score", "perplexity", "loss", "retention_score",
                                               "retention_text_perplexity"),
                                      pattern=(r"[A-Za-z0-9][A-Za-z0-9_.-]*_(score|perplexity|loss)",
                                               "NAME_score / NAME_perplexity / NAME_loss of a named evaluation set"))
    progress_bar: bool = _opt(True, "show a tqdm progress bar")
    parallel: str = _opt("ddp", "with several processes (torchrun / accelerate launch): ddp replicates the model "
                         "and all-reduces gradients; fsdp shards every block and the rest with FSDP2 (full "
                         "fine-tuning; teacher copies are sharded the same way)", choices=("ddp", "fsdp"))
    mixed_precision: str = _opt("auto", "bf16: compute in bfloat16 on fp32 master weights and optimizer state (TRL's "
                                "bf16=True): autocast on one process and under DDP, FSDP2's MixedPrecisionPolicy "
                                "(gradients reduced in fp32) under parallel=fsdp; the fused loss reads bf16 hidden "
                                "states and head and accumulates in fp32. fp16: the same in float16 with dynamic "
                                "loss scaling (TRL's fp16=True; for GPUs without bf16: a step whose gradients "
                                "overflow is skipped and the scale halved). no: the weights' dtype. auto: bf16 on a "
                                "CUDA device that supports it, else no", choices=("auto", "no", "bf16", "fp16"))
    disable_dropout: bool = _opt(False, "set every dropout of the model to 0 for training (TRL's disable_dropout, "
                                 "True there); LoRA's own lora_dropout is kept")
    dtype: str = _opt("float32", "dtype the weights are loaded in (a model path or the embedded model; a model "
                      "object keeps its own): bfloat16 halves weight, gradient and AdamW memory for models that "
                      "do not fit in fp32, but then the weights themselves are bf16 and updates smaller than "
                      "2^-8 of a weight are rounded away; prefer mixed_precision=bf16 where fp32 fits",
                      choices=("float32", "bfloat16"))
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    cpu_trim_memory: bool = _opt(True, "on a CPU with glibc: before each backward give the heap memory freed by "
                                 "the rollouts and the forward back to the OS (malloc_trim), so the gradients "
                                 "do not stack on freed but resident pages (sdft.runtime.heap_trim)")

    def __post_init__(self):
        self.distillation_mode = MODE_ALIASES.get(self.distillation_mode, self.distillation_mode)
        for f in fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        for name in PATH_FIELDS:  # as TrainingArguments does: "~/runs" is never a folder named "~"
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        if not DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        spec = make_spec(self.divergence, self.distillation_alpha, self.distillation_temperature)
        if self.distillation_mode == "sampled_token" and spec.kind != "reverse_kl":
            raise ValueError("distillation_mode=sampled_token is a reverse-KL estimator: set divergence=reverse_kl "
                             "(TRL: distillation_alpha=1.0)")
        unknown = [name for name in self.report_to if name not in REPORT_BACKENDS]
        if unknown:
            raise ValueError(f"unknown report_to {unknown[0]!r}; expected one of {', '.join(REPORT_BACKENDS)}")
        get_scorer(self.eval_scorer)
        get_scorer(self.retention_scorer)
        check_template(self.teacher_template)
        check_column_map("column_map", self.column_map)
        if self.parallel == "fsdp" and self.use_lora:
            raise ValueError("parallel=fsdp shards a full fine-tune; train LoRA adapters with parallel=ddp")
        if self.load_best_model_at_end and self.parallel == "fsdp":
            raise ValueError("load_best_model_at_end keeps whole weights: not supported with parallel=fsdp")
        if self.parallel == "fsdp" and self.optim not in ADAMW:
            raise ValueError(f"optim={self.optim!r}: parallel=fsdp steps AdamW (adamw_torch_fused, adamw_torch) on its "
                             "sharded weights; use parallel=ddp (or LoRA) for another optimizer")
        OptimizerSettings.from_config(self).check()
        if self.attn_implementation in FLASH:
            if self.tree_attention != "auto":
                raise ValueError(f"tree_attention={self.tree_attention} sets the prefix tree's mask, which "
                                 f"{self.attn_implementation} does not take (prompts are shared through the KV cache "
                                 "there): leave tree_attention=auto or use attn_implementation=sdpa")
            if self.share_teacher_prefix:
                raise ValueError("share_teacher_prefix packs prompts and teacher contexts into one prefix tree, which "
                                 f"{self.attn_implementation} does not take: use attn_implementation=sdpa")
        if self.mixed_precision == "fp16" and self.dtype != "float32":
            raise ValueError(f"mixed_precision=fp16 scales the loss for fp32 master weights; with dtype={self.dtype} "
                             "use mixed_precision=no (or bf16)")
        if self.num_loss_tokens_to_skip >= self.max_completion_length:
            raise ValueError(f"num_loss_tokens_to_skip={self.num_loss_tokens_to_skip} leaves no token of a "
                             f"max_completion_length={self.max_completion_length} rollout in the loss: nothing would "
                             "train; set it below max_completion_length")
        if self.distillation_mode == "topk_logits" and self.distillation_topk == 1 and not self.distillation_add_tail:
            raise ValueError("distillation_topk=1 without distillation_add_tail: over a one-token support both "
                             "distributions are 1 and every divergence is 0, so nothing would train; set "
                             "distillation_add_tail=true or a larger distillation_topk")
        if self.min_lr_rate and self.lr_scheduler_type not in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
            raise ValueError(f"min_lr_rate={self.min_lr_rate} is where cosine_with_min_lr ends; with "
                             f"lr_scheduler_type={self.lr_scheduler_type} set lr_scheduler_type=cosine_with_min_lr "
                             "or min_lr_rate=0")
        floors = sorted({"min_lr", "min_lr_rate"} & set(self.lr_scheduler_kwargs))
        if self.min_lr_rate and floors:
            raise ValueError(f"min_lr_rate={self.min_lr_rate} and lr_scheduler_kwargs {floors[0]!r} both set where the "
                             "cosine ends: give one of them")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio} both set the "
                             "warmup: give one of them")
        if self.top_p > 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filtering), got {self.top_p}")
        if self.resume_from_checkpoint is not False and self.overwrite_output_dir:
            raise ValueError("resume_from_checkpoint and overwrite_output_dir exclude each other")

    @property
    def evaluation_rule(self) -> str | None:
        """The setting that evaluates during training, as a user wrote it (None: before and after only)."""
        if self.eval_strategy == "epoch":
            return "eval_strategy=epoch"
        return f"eval_steps={self.eval_steps}" if self.eval_steps else None

    @property
    def eval_tokens(self) -> int:
        """Tokens a greedy evaluation answer may take."""
        return self.eval_max_new_tokens or self.max_completion_length

    def check_device(self):
        """The device is here, and the attention implementation runs on it (run-time checks, kept out of
        ``__post_init__`` so that a config saved on a GPU machine still reads, shows and exports on a CPU one)."""
        from sdft.models.attention import check_implementation
        from sdft.runtime.inference import check_device
        from sdft.runtime.precision import check_tf32, compute_precision

        device = check_device(self.device)
        check_implementation(self.attn_implementation, device.type, compute_precision(self.mixed_precision, device),
                             self.dtype)
        check_tf32(self.tf32, device)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> "SDFTConfig":
        """From a mapping of field names (TRL's names in ``TRL_ALIASES`` accepted too)."""
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise TypeError(f"SDFTConfig.from_dict takes a dict of option names, got {type(values).__name__}")
        values = _translate_aliases(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(unknown_options(unknown, known))
        return cls(**values)

    @classmethod
    def from_strings(cls, pairs: dict[str, str], base: dict | None = None) -> "SDFTConfig":
        """From CLI ``KEY=VALUE`` text over ``base`` values, each parsed by its field's type (not JSON)."""
        by_name = {f.name: f for f in fields(cls)}
        aliases = _translate_aliases({k: v for k, v in pairs.items() if k in TRL_ALIASES}, text=True)
        pairs = {k: v for k, v in pairs.items() if k not in TRL_ALIASES}
        unknown = sorted(set(pairs) - set(by_name))
        if unknown:
            raise ValueError(unknown_options(unknown, by_name))
        clash = sorted(set(aliases) & set(pairs))
        if clash:
            raise ValueError(f"give {clash[0]} or its TRL name, not both")
        parsed = {k: parse_text(by_name[k], v) for k, v in pairs.items()}
        return cls(**{**(base or {}), **parsed, **aliases})

    @classmethod
    def paper(cls, **overrides) -> "SDFTConfig":
        """What the SDFT paper's results ran with (../shared/paper-facts.md): forward KL over the full
        vocabulary, EMA teacher (rate 0.01), the paper's teacher template, the first 3 completion
        tokens left out of the loss, one rollout per prompt, per-sequence means, sequence-level IS
        capped at 2.0, cosine schedule with warmup (10%: our choice, the paper names no ratio),
        gradient checkpointing, lr 1e-5."""
        values = dict(divergence="forward_kl", distillation_mode="full_logits", teacher_mode="ema", ema_decay=0.99,
                      teacher_template="paper", num_loss_tokens_to_skip=3, num_generations=1,
                      loss_normalization="sequence_mean", distillation_is_clip=2.0, distillation_is_level="sequence",
                      lr_scheduler_type="cosine", warmup_ratio=0.1, learning_rate=1e-5, gradient_checkpointing=True,
                      weight_decay=0.0, max_grad_norm=1.0, temperature=1.0)
        return cls(**{**values, **overrides})

    @classmethod
    def trl(cls, **overrides) -> "SDFTConfig":
        """TRL's SDFTConfig defaults: JSD (alpha 0.5) on the student's top-100 ids renormalised, frozen
        base teacher, 8 rollouts of up to 256 tokens (one prompt a step: TRL's batch of 8 counts
        completions), template "{prompt}\n\n{demonstration}", per-sequence means, gradient
        checkpointing, lr 5e-5 with linear decay. TRL's distillation_is_clip=2.0 only acts on
        reused rollouts, which sdft never reuses, so it is off here."""
        values = dict(distillation_mode="topk_logits", distillation_topk=100, distillation_topk_support="student",
                      distillation_add_tail=False, divergence="jsd", distillation_alpha=0.5, teacher_mode="frozen",
                      ema_decay=0.95, num_generations=8, max_completion_length=256, max_prompt_length=512,
                      per_device_train_batch_size=1, learning_rate=5e-5, lr_scheduler_type="linear",
                      teacher_template="{prompt}\n\n{demonstration}", num_loss_tokens_to_skip=0,
                      loss_normalization="sequence_mean", gradient_checkpointing=True, temperature=1.0)
        return cls(**{**values, **overrides})


def _type_name(f) -> str:
    if f.metadata.get("kind") == "resume":
        return "bool|path"
    if f.metadata.get("kind") == "optional":
        return "str?"
    if f.metadata.get("kind") == "optional_float":
        return "float|none"
    if f.metadata.get("kind") == "kwargs":
        return "kwargs"
    return {"int": "int", "float": "float", "str": "str", "bool": "bool", "list[str]": "list[str]",
            "dict": "json"}[str(f.type)]


def _checked(f, value):
    """``value`` if it fits field ``f`` (ints are accepted for floats); otherwise a one-line error."""
    kind, name = _type_name(f), f.name
    if kind == "bool|path":
        if isinstance(value, bool) or (isinstance(value, str) and value):
            return value
        raise ValueError(f"{name} must be true, false or a checkpoint path, got {value!r}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if kind == "float|none":
        if value is None:
            return None
        kind = "float"
    if kind == "str?":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    elif kind == "list[str]":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or \
                not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{name} must be a non-empty list of names, got {value!r}")
        value = list(value)
    elif kind == "json":
        value = checked_template_kwargs(name, value)
    elif kind == "kwargs":
        value = json_mapping(name, value, "keyword names")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        value = float(value)
    meta = f.metadata
    pattern = meta.get("pattern")
    if meta["choices"] is not None and value not in meta["choices"] and not (
            pattern is not None and isinstance(value, str) and re.fullmatch(pattern[0], value)):
        also = f", or {pattern[1]}" if pattern is not None else ""
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(meta['choices'])}{also}")
    if meta["positive"] and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ValueError(f"{name} must be >= {meta['minimum']}, got {value}")
    if meta["below"] is not None and not value < meta["below"]:
        raise ValueError(f"{name} must be below {meta['below']:g}, got {value}")
    return value


TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_text(f, text: str):
    """Parse CLI text for field ``f`` by its declared type; the range check follows in the config."""
    kind, name = _type_name(f), f.name
    low = text.strip().lower()
    if kind in ("bool", "bool|path"):
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        if kind == "bool":
            raise ValueError(f"{name} must be true or false, got {text!r}")
        return text
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if kind == "float|none" and low in ("none", "null", ""):
        return None
    if kind in ("float", "float|none"):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {text!r}") from None
    if kind == "list[str]":
        if text.strip().startswith("["):  # a JSON list, as a config file writes it
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"{name} must be names separated by commas or a JSON list, got {text!r}") from None
        return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
    if kind == "json":
        return parse_template_kwargs(name, text)
    if kind == "kwargs":
        try:
            return json_mapping(name, json.loads(text) if text.strip() else {}, "keyword names")
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} must be a JSON object, e.g. '{{\"num_cycles\": 2}}', got {text!r} "
                             f"({err.msg})") from None
    return text


def describe_fields() -> str:
    """One line per config key: name, type, default and meaning (for ``sdft train --help``)."""
    lines = []
    for f in fields(SDFTConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        if isinstance(default, list):
            default = ",".join(default)
        if isinstance(default, bool) or default == "" or default is None:
            default = json.dumps(default) if default is not None else "none"
        lines.append(f"  {f.name} ({_type_name(f)}, default {default})\n      {f.metadata['help']}")
    return "\n".join(lines)
