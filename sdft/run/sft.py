"""Plain supervised fine-tuning on the demonstrations: the baseline SDFT is measured against.

Same data, optimizer, batching, step budget, checkpoints and metrics as ``sdft.train``; the loss is
the cross-entropy of the demonstration tokens (and the end-of-turn) given the prompt.
"""
from __future__ import annotations

import time

import torch

from sdft.config import SDFTConfig
from sdft.data.chat import demonstration_ids_many
from sdft.models.positions import check_room
from sdft.run.held_out import cross_entropy
from sdft.run.loop import TrainResult, batch_indices, clip_and_step, run_steps
from sdft.run.metrics import peak_memory_mib
from sdft.run.prepare import prepare, start_runner
from sdft.runtime.distributed import all_reduce_sum
from sdft.runtime.precision import scale_record


def demonstration_loss(model, ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Summed cross-entropy of the tokens after the prompt (the demonstration and its end of turn)."""
    logits = model(input_ids=ids[None]).logits[0, prompt_length - 1: -1].float()
    return torch.nn.functional.cross_entropy(logits, ids[prompt_length:], reduction="sum")


def encode_demonstrations(examples, tokenizer, config, positions: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """Each row's chat with its demonstration, on the CPU; a row over the two length limits, or past the
    model's ``positions`` (``position_limit``), is an error."""
    limit = config.max_prompt_length + config.max_completion_length
    encoded = demonstration_ids_many(tokenizer, examples, "cpu", limit)
    for i, (ex, (ids, _)) in enumerate(zip(examples, encoded)):
        check_room(ids.numel(), positions, ex.where or f"example {i}", "the prompt with its demonstration",
                   "shorten the row")
    return encoded


def train_sft(model=None, dataset=None, config: SDFTConfig | dict | None = None, tokenizer=None,
              step_callback=None, eval_scorer=None, eval_dataset=None, eval_callback=None) -> TrainResult:
    """Fine-tune with token cross-entropy on the demonstrations (arguments as ``sdft.train``)."""
    run = prepare(model, dataset, config, tokenizer, eval_scorer, eval_dataset, encode=encode_demonstrations)
    config, model, device = run.config, run.model, run.device
    encoded = [(ids.to(device), prompt_length) for ids, prompt_length in run.encoded]
    runner = start_runner(run)

    def step_fn(optimizer, step):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batches = [batch_indices(step, micro, len(encoded), config, run.world)
                   for micro in range(config.gradient_accumulation_steps)]
        tokens = int(all_reduce_sum(sum(encoded[i][0].numel() - encoded[i][1] for batch in batches for i in batch),
                                    run.world))
        loss_sum = 0.0
        order = [i for batch in batches for i in batch]
        for k, i in enumerate(order):  # gradients summed across processes with the last one
            loss_sum += float(runner.backward(demonstration_loss, *encoded[i], divisor=tokens,
                                              sync=k == len(order) - 1))
        loss_sum = all_reduce_sum(loss_sum, run.world)
        scale = scale_record(runner.scaler)
        grad_norm, skipped = clip_and_step(model, optimizer, config, step, loss_sum / tokens, runner.scaler)
        elapsed = time.perf_counter() - t0
        seen = (step + 1) * config.per_device_train_batch_size * config.gradient_accumulation_steps * run.world.size
        return {"step": step + 1, "epoch": seen / len(encoded), "loss": loss_sum / tokens,
                "divergence": "sft_cross_entropy",
                "grad_norm": grad_norm, "skipped": skipped, "learning_rate": optimizer.param_groups[0]["lr"],
                "tokens": tokens, "tokens_per_s": tokens / elapsed,
                "peak_memory_mib": peak_memory_mib(device), "seconds": elapsed, **scale}

    return run_steps(run, step_fn, step_callback=step_callback, desc="sft", eval_callback=eval_callback,
                     eval_loss=cross_entropy)
