"""``sdft train --dry-run``: what a run would do, checked as the run checks it, before renting the device it
needs: every row measured with the model's tokenizer (over-long rows are the run's own one-line errors), the
steps, the model's size and the memory its training state takes (``sdft.run.memory_plan``), and what
``output_dir`` holds. No weights load (but the embedded model's, whose tokenizer lives in its GGUF) and
nothing is written."""
from __future__ import annotations

from pathlib import Path

import torch

from sdft.data.examples import Example, eval_sets
from sdft.models.loading import load_model, load_tokenizer, meta_model
from sdft.models.positions import position_limit
from sdft.run.activation_plan import scoring_plan
from sdft.run.memory_plan import device_memory, rollout_plan, training_state
from sdft.run.prepare import parameters_text
from sdft.run.trainer import encode_examples, positions_note
from sdft.runtime.inference import run_device
from sdft.runtime.precision import compute_precision, cpu_precision_note


def dry_run(model, examples: list[Example], eval_examples, config, resume: Path | None,
            processes: int = 1) -> list[str]:
    """The lines that describe the run ``sdft train`` would start (``model``: None, a path or a Hub id)."""
    from sdft.data.chat import with_template_kwargs

    tokenizer = load_tokenizer(model)
    if tokenizer is None:  # the embedded model before its first load: its tokenizer comes with its weights
        _, tokenizer = load_model(None)
    tokenizer = with_template_kwargs(tokenizer, config.chat_template_kwargs)
    encoded = encode_examples(examples, tokenizer, config, positions=position_limit(model))
    prompts = [e.prompt_ids.numel() for e in encoded]
    teachers = [e.teacher_ids.numel() for e in encoded]
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * processes
    held_out = sum(len(rows) for rows in eval_sets(eval_examples).values())
    meta = meta_model(model)
    lines = [
        "sdft: dry run: every check a run makes before its weights load passed; nothing was written",
        f"model: {model_line(model, meta, config.dtype)}",
        f"training rows: {len(examples)}; prompt tokens {min(prompts)}-{max(prompts)} (mean "
        f"{sum(prompts) / len(prompts):.0f}), teacher context tokens up to {max(teachers)} of "
        f"max_prompt_length={config.max_prompt_length}" + (f"; held-out rows: {held_out}" if held_out else ""),
        f"steps: {config.max_steps}, each {per_step} prompts x {config.num_generations} rollouts of up to "
        f"{config.max_completion_length} tokens ({config.max_steps * per_step / len(examples):.3g} passes over the "
        "rows)",
        f"output_dir: {config.output_dir}: " + (f"resumes from {resume}" if resume is not None else "a new run"),
    ]
    device = run_device(config.device)
    lines.append(compute_line(config, device, processes))
    emulated = cpu_precision_note(config.mixed_precision, device, config.dtype)
    lines += [emulated] if emulated is not None else []
    if meta is not None:
        state, available = training_state(meta, config, processes, device), device_memory(device)
        lines.append(state.line(available))
        sources = [(e.teacher_ids if config.generate_from_teacher else e.prompt_ids).tolist() for e in encoded]
        cache = rollout_plan(meta, sources, config, device)
        if cache is not None and cache.total:
            lines.append(cache.line(config))
        scoring = scoring_plan(meta, [e.prompt_ids.tolist() for e in encoded], config, device,
                               [e.teacher_ids.tolist() for e in encoded])
        if scoring is not None:
            lines.append(scoring.line())
        lines += [w for w in [state.warning(available, config, cache.total if cache else 0,
                                            scoring.total if scoring else 0)] if w]
    note = positions_note(encoded, config.max_completion_length, getattr(meta, "config", None))
    lines += [note] if note is not None else []
    return lines


def compute_line(config, device: torch.device, processes: int) -> str:
    """Where the run computes and in what precision (``mixed_precision`` resolved for ``device``)."""
    where = "the CPU" if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    if processes > 1:
        where = f"{processes} processes" + (", each on its own GPU" if device.type == "cuda" else " on the CPU")
    precision = compute_precision(config.mixed_precision, device)
    what = {"bf16": f"bf16 autocast over {config.dtype} weights and optimizer state",
            "fp16": "fp16 autocast with dynamic loss scaling over float32 weights and optimizer state",
            }.get(precision, f"{config.dtype} throughout")
    return f"compute: {where}, {what} (mixed_precision={config.mixed_precision})"


def model_line(model, meta, dtype: str) -> str:
    """The model's name and, with its ``meta`` model, its family, parameter count and weights' size in
    ``dtype``."""
    name = "the embedded SmolLM2-135M-Instruct" if model is None else str(model)
    if meta is None:
        return name
    count = sum(p.numel() for p in meta.parameters())  # a tied head is one parameter
    size = count * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return (f"{name} ({meta.config.model_type}, {parameters_text(count)} parameters: its weights take "
            f"{size / 2**30:.2f} GiB in {dtype})")
