"""``sdft train --dry-run``: what a run would do, checked as the run checks it, before renting the device it
needs: every row measured with the model's tokenizer (over-long rows are the run's own one-line errors), the
steps, the model's size, and what ``output_dir`` holds. No weights load (but the embedded model's, whose
tokenizer lives in its GGUF) and nothing is written."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sdft.data.examples import Example, eval_sets
from sdft.models import hub
from sdft.models.loading import load_model, load_tokenizer
from sdft.models.positions import position_limit
from sdft.run.prepare import parameters_text
from sdft.run.trainer import encode_examples


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
    lines = [
        "sdft: dry run: every check a run makes before its weights load passed; nothing was written",
        f"model: {model_line(model, config.dtype)}",
        f"training rows: {len(examples)}; prompt tokens {min(prompts)}-{max(prompts)} (mean "
        f"{sum(prompts) / len(prompts):.0f}), teacher context tokens up to {max(teachers)} of "
        f"max_prompt_length={config.max_prompt_length}" + (f"; held-out rows: {held_out}" if held_out else ""),
        f"steps: {config.max_steps}, each {per_step} prompts x {config.num_generations} rollouts of up to "
        f"{config.max_completion_length} tokens ({config.max_steps * per_step / len(examples):.3g} passes over the "
        "rows)",
        f"output_dir: {config.output_dir}: " + (f"resumes from {resume}" if resume is not None else "a new run"),
    ]
    return lines


def model_line(model, dtype: str) -> str:
    """The model's name and, for a Hugging Face folder or Hub id, its parameter count and weights' size in
    ``dtype`` (built on the meta device from its config: nothing is allocated)."""
    if model is None:
        return "the embedded SmolLM2-135M-Instruct"
    folder = hub.folder_of(model)
    if not (folder / "config.json").is_file():  # a .gguf
        return str(model)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    count = sum(p.numel() for p in meta.parameters())  # a tied head is one parameter
    size = count * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "?")
    return (f"{model} ({name}, {parameters_text(count)} parameters: its weights take {size / 2**30:.2f} GiB in "
            f"{dtype}, before gradients, optimizer state, a teacher copy and activations)")
