"""``sdft.train``: on-policy self-distillation fine-tuning.

Each optimizer step: for every prompt in the micro-batch sample G rollouts from the student, score
their tokens with the teacher (the model with the demonstration in context, no gradient), and
minimise the per-token divergence with the fused LM-head kernel. Prompt and teacher context are
computed once per prompt and shared by the G rollouts (``share_prefix``).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft_kernels.prefix_sharing import tokens_processed

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import SDFTConfig
from .data import Example, load_examples
from .group_loss import group_loss
from .metrics import MetricsLog, peak_memory_mib
from .models import load_model
from .rollouts import chat_ids, sample_rollouts
from .teacher import Teacher
from .templates import teacher_messages


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    step: int
    metrics: list[dict] = field(default_factory=list)
    output_dir: Path | None = None


@dataclass
class EncodedExample:
    prompt_ids: torch.Tensor
    teacher_ids: torch.Tensor


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def encode_examples(examples: list[Example], tokenizer, config: SDFTConfig, device) -> list[EncodedExample]:
    """Token ids of every prompt and teacher context; too long ones are an error naming the example."""
    encoded = []
    for i, ex in enumerate(examples):
        prompt = chat_ids(tokenizer, ex.messages(), device)
        teacher = chat_ids(tokenizer, teacher_messages(ex.messages(), ex.demonstration, config.teacher_template),
                           device)
        for what, ids in (("prompt", prompt), ("teacher context (prompt + demonstration)", teacher)):
            if ids.numel() > config.max_prompt_length:
                raise ValueError(f"example {i}: the {what} has {ids.numel()} tokens, over "
                                 f"max_prompt_length={config.max_prompt_length}")
        encoded.append(EncodedExample(prompt, teacher))
    return encoded


def _apply_lora(model, config: SDFTConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def batch_indices(step: int, micro: int, n: int, config: SDFTConfig) -> list[int]:
    """Prompts of one micro-step: a fresh seeded shuffle each epoch, so a resumed run sees the same order."""
    per_step = config.per_device_train_batch_size
    start = (step * config.gradient_accumulation_steps + micro) * per_step
    out = []
    for k in range(start, start + per_step):
        epoch, pos = divmod(k, n)
        order = list(range(n))
        random.Random(config.seed * 100_003 + epoch).shuffle(order)
        out.append(order[pos])
    return out


def _resume_path(config: SDFTConfig):
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint is True:
        found = list_checkpoints(config.output_dir)
        return found[-1] if found else None
    return Path(config.resume_from_checkpoint)


def prepare(model, dataset, config, tokenizer):
    """(config, model, tokenizer, examples, device) with defaults filled in and LoRA applied."""
    if config is None:
        config = SDFTConfig()
    elif isinstance(config, dict):
        config = SDFTConfig.from_dict(config)
    device = _device(config.device)
    torch.manual_seed(config.seed)
    if model is None or isinstance(model, (str, Path)):
        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with a model object")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if dataset is None:
        from .skill import load_skill

        dataset = load_skill("train")
    examples = load_examples(dataset)
    model.to(device)
    if config.use_lora:
        model = _apply_lora(model, config)
    model.train()
    return config, model, tokenizer, examples, device


def run_steps(model, tokenizer, config, step_fn, teacher=None, step_callback=None, desc="sdft") -> TrainResult:
    """The optimizer loop shared by SDFT and the SFT baseline: resume, steps, metrics, checkpoints.

    ``step_fn(optimizer, step)`` runs one optimizer step and returns its metrics record. ``teacher``
    (SDFT only; None for SFT) is checkpointed and restored with the model.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    log = MetricsLog(Path(config.output_dir) / "metrics.jsonl")
    start = 0
    resume = _resume_path(config)
    if resume is not None:
        start = load_checkpoint(resume, model, optimizer, teacher)
    history = []
    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, desc=desc,
               disable=not config.progress_bar)
    for step in bar:
        record = step_fn(optimizer, step)
        history.append(record)
        if (step + 1) % config.logging_steps == 0:
            log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (step + 1) % config.save_steps == 0 or step + 1 == config.max_steps:
            save_checkpoint(config.output_dir, step + 1, model, optimizer, teacher, config,
                            config.save_total_limit)
        if step_callback is not None:
            step_callback(step + 1, record)
    return TrainResult(model, tokenizer, config.max_steps, history, Path(config.output_dir))


def train(model=None, dataset=None, config: SDFTConfig | dict | None = None, tokenizer=None,
          step_callback=None) -> TrainResult:
    """Fine-tune ``model`` on ``dataset`` (prompt + demonstration rows) with SDFT.

    ``model``: None (embedded SmolLM2-135M-Instruct), a local path, or a transformers model (then
    pass ``tokenizer``). ``dataset``: a .jsonl path, a list of dicts or a HF Dataset; None uses the
    bundled tool-call skill. ``step_callback(step, record)`` is called after each optimizer step.
    """
    config, model, tokenizer, examples, device = prepare(model, dataset, config, tokenizer)
    encoded = encode_examples(examples, tokenizer, config, device)
    teacher = Teacher(model, config.teacher_mode, config.ema_decay)

    def step_fn(optimizer, step):
        return _train_step(model, tokenizer, teacher, optimizer, encoded, step, config, device)

    return run_steps(model, tokenizer, config, step_fn, teacher, step_callback)


def clip_and_step(model, optimizer, config) -> float:
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               config.max_grad_norm)
    optimizer.step()
    return float(grad_norm)


def _train_step(model, tokenizer, teacher, optimizer, encoded, step, config, device) -> dict:
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    tokens = shared_tokens = naive_tokens = 0
    completion_lengths = []
    for micro in range(config.gradient_accumulation_steps):
        groups = []
        for idx in batch_indices(step, micro, len(encoded), config):
            ex = encoded[idx]
            rollouts = sample_rollouts(model, tokenizer, ex.prompt_ids, config.num_generations,
                                       config.max_completion_length, config.temperature)
            groups.append((ex, rollouts))
        micro_tokens = sum(r.num_tokens for _, r in groups)
        for ex, rollouts in groups:
            loss = group_loss(model, teacher, rollouts, ex.teacher_ids, config)
            (loss / (micro_tokens * config.gradient_accumulation_steps)).backward()
            loss_sum += float(loss.detach())
            length = rollouts.completions.shape[1]
            for ctx in (ex.prompt_ids.numel(), ex.teacher_ids.numel()):
                s, n = tokens_processed(ctx, length, config.num_generations)
                shared_tokens += s
                naive_tokens += n
            completion_lengths += rollouts.mask.sum(1).tolist()
        tokens += micro_tokens
    grad_norm = clip_and_step(model, optimizer, config)
    teacher.update()
    elapsed = time.perf_counter() - t0
    return {
        "step": step + 1,
        "loss": loss_sum / max(tokens, 1),
        "divergence": config.divergence,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "mean_completion_length": sum(completion_lengths) / max(len(completion_lengths), 1),
        "tokens_processed": shared_tokens if config.share_prefix else naive_tokens,
        "tokens_processed_unshared": naive_tokens,
        "peak_memory_mib": peak_memory_mib(device),
        "seconds": elapsed,
    }
