"""``sdft.train``: on-policy self-distillation fine-tuning.

Each optimizer step: for every prompt in the micro-batch sample G rollouts from the student, score
their tokens with the teacher (the model with the demonstration in context, no gradient), and
minimise the per-token divergence with the fused LM-head kernel. Prompt and teacher context are
computed once per prompt and shared by the G rollouts (``share_prefix``).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from sdft.config import SDFTConfig
from sdft.data.chat import chat_ids_many
from sdft.data.examples import Example
from sdft.data.templates import teacher_messages
from sdft.loss.batch import BatchLoss
from sdft.loss.teacher import Teacher
from sdft.models import output_layer
from sdft.models.positions import built_positions, check_room, past_built_positions
from sdft.prefix.packed import tokens_processed
from sdft.rollout.checks import check_engine, check_rollouts
from sdft.rollout.engine import HFRolloutEngine, RolloutEngine
from sdft.rollout.sampling import Sampling
from sdft.run.held_out import HeldOutLoss
from sdft.run.loop import TrainResult, batch_indices, clip_and_step, run_steps
from sdft.run.metrics import peak_memory_mib
from sdft.run.prepare import Run, prepare, start_runner
from sdft.run.run_dir import report_line
from sdft.runtime.distributed import all_reduce_sum, step_seed
from sdft.runtime.precision import scale_record


@dataclass
class EncodedExample:
    prompt_ids: torch.Tensor
    teacher_ids: torch.Tensor


def encode_examples(examples: list[Example], tokenizer, config: SDFTConfig, device="cpu",
                    positions: int | None = None) -> list[EncodedExample]:
    """Token ids of every prompt and teacher context; too long ones are an error naming the example: over
    ``max_prompt_length``, or with a whole rollout past the model's ``positions`` (``position_limit``)."""
    wheres = [ex.where or f"example {i}" for i, ex in enumerate(examples)]
    prompts = chat_ids_many(tokenizer, [ex.messages() for ex in examples], device, wheres)
    teachers = chat_ids_many(tokenizer, [teacher_messages(ex.messages(), ex.demonstration, config.teacher_template)
                                         for ex in examples], device, [f"{w} (its teacher context)" for w in wheres])
    encoded = []
    for where, prompt, teacher in zip(wheres, prompts, teachers):
        for what, ids in (("prompt", prompt), ("teacher context (prompt + demonstration)", teacher)):
            if ids.numel() > config.max_prompt_length:
                raise ValueError(f"{where}: the {what} has {ids.numel()} tokens, over "
                                 f"max_prompt_length={config.max_prompt_length} (raise it, or shorten the row)")
            check_room(ids.numel() + config.max_completion_length - 1, positions, where,  # the last is never fed
                       f"the {what} and a rollout of max_completion_length={config.max_completion_length}",
                       "lower max_completion_length or shorten the row")
        encoded.append(EncodedExample(prompt, teacher))
    return encoded


def positions_note(encoded, max_completion_length: int, model_config) -> str | None:
    """``past_built_positions`` for the rows' token ids (``encode_examples``'s; None: not encoded here)."""
    if not encoded:
        return None
    longest = max(max(e.prompt_ids.numel(), e.teacher_ids.numel()) for e in encoded)
    return past_built_positions(longest, max_completion_length, built_positions(model_config))


def train(model=None, dataset=None, config: SDFTConfig | dict | None = None, tokenizer=None,
          step_callback=None, engine: RolloutEngine | None = None, eval_scorer=None,
          eval_dataset=None, eval_callback=None) -> TrainResult:
    """Fine-tune ``model`` on ``dataset`` (prompt + demonstration rows) with SDFT.

    ``model``: None (embedded SmolLM2-135M-Instruct), a local path, or a transformers model (then
    pass ``tokenizer``). ``dataset``: a file (.jsonl, .json, .parquet, .csv), a saved dataset folder, a Hub
    dataset id (``ORG/NAME[:CONFIG][:SPLIT]``; ``sdft.data.sources``), a list of dicts or a HF Dataset; None
    uses the bundled tool-call skill. ``step_callback(step, record)`` is called after each optimizer step; when it
    returns True the run ends there (checkpoint, evaluation and final model as at ``max_steps``).
    ``engine``: the rollout engine (default: batched Hugging Face sampling, ``HFRolloutEngine``).
    ``eval_scorer``: a callable ``(answer, demonstration) -> float`` overriding ``config.eval_scorer``
    for the evaluation on ``config.eval_data``. ``eval_dataset``: held-out rows (as ``dataset``) in place
    of ``config.eval_data``, or a mapping of names to such sets (each evaluated apart, as NAME_score, ...).
    ``eval_callback(step, record)`` is called after each evaluation (its ``eval.json`` record).
    """
    if engine is not None:
        check_engine(engine)
    run = prepare(model, dataset, config, tokenizer, eval_scorer, eval_dataset, encode=encode_examples)
    note = positions_note(run.encoded, run.config.max_completion_length, getattr(run.model, "config", None))
    if note is not None and run.world.is_main:
        report_line(note)
    encoded = [EncodedExample(e.prompt_ids.to(run.device), e.teacher_ids.to(run.device)) for e in run.encoded]
    teacher = Teacher(run.model, run.config.teacher_mode, run.config.ema_decay)
    start_runner(run, teacher)
    sampling = Sampling.from_config(run.config)
    if engine is not None and (sampling.filters or sampling.penalizes) and run.world.is_main:
        report_line(f"sdft: top_k={sampling.top_k} top_p={sampling.top_p} min_p={sampling.min_p} "
                    f"repetition_penalty={sampling.repetition_penalty} are the built-in engine's: the engine "
                    "passed samples as it is set up itself")
    engine = engine or HFRolloutEngine(run.tokenizer, run.config.decode_gemm, run.config.tree_attention, sampling)
    loss = BatchLoss.from_config(run.config)

    def step_fn(optimizer, step):
        return _train_step(run, teacher, engine, loss, optimizer, encoded, step)

    held_out = HeldOutLoss(run, teacher, engine, loss, encode_examples)
    return run_steps(run, step_fn, teacher, step_callback, eval_callback=eval_callback, eval_loss=held_out)


def terminated_lengths(lengths: list[int], limit: int) -> dict:
    """TRL's terminated-length metrics: the lengths of the rollouts that ended before ``limit`` (0 when
    none did, as TRL reports)."""
    ended = [n for n in lengths if n < limit] or [0]
    return {"mean_terminated_length": sum(ended) / len(ended), "shortest_terminated": min(ended),
            "longest_terminated": max(ended)}


def _train_step(run: Run, teacher, engine, batch_loss: BatchLoss, optimizer, encoded, step) -> dict:
    config, model = run.config, run.model
    pad_id = run.tokenizer.pad_token_id
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    tokens = naive_tokens = 0
    passes = []  # token passes of every scoring pass (tree nodes), from the passes themselves
    completion_lengths = []
    world = run.world
    if world.active:  # different rollouts per process; the same again after a resume
        torch.manual_seed(step_seed(config.seed, step, world.rank))
    micro_batches = []
    vocab = output_layer(model).weight.shape[0]
    for micro in range(config.gradient_accumulation_steps):
        chosen = [encoded[i] for i in batch_indices(step, micro, len(encoded), config, world)]
        sources = [ex.teacher_ids if config.generate_from_teacher else ex.prompt_ids for ex in chosen]
        batch = run.runner(engine.generate, sources, config.num_generations, config.max_completion_length,
                           config.temperature)
        check_rollouts(batch, len(sources), config.num_generations, config.max_completion_length, vocab)
        if config.generate_from_teacher:  # sampled from the teacher context, scored from the prompt
            batch = dataclasses.replace(batch, prompts=[ex.prompt_ids for ex in chosen])
        micro_batches.append((batch, [ex.teacher_ids for ex in chosen]))
    t_rollouts = time.perf_counter()
    divisor = max(all_reduce_sum(sum(batch_loss.normaliser(batch) for batch, _ in micro_batches), world), 1)
    for i, (batch, contexts) in enumerate(micro_batches):
        loss = run.runner.backward(batch_loss, teacher, batch, contexts, pad_id, passes, divisor=divisor,
                                   sync=i == len(micro_batches) - 1)
        loss_sum += float(loss)
        width = batch.completions.shape[1]
        for side in (batch.prompts, contexts):
            naive_tokens += tokens_processed([c.numel() for c in side], width, batch.group_size)[1]
        completion_lengths += batch.mask.sum(1).tolist()
        tokens += batch.num_tokens
    loss = all_reduce_sum(loss_sum, world) / divisor
    tokens = int(all_reduce_sum(tokens, world))
    t_loss = time.perf_counter()
    scale = scale_record(run.runner.scaler)
    grad_norm, skipped = clip_and_step(model, optimizer, config, step, loss, run.runner.scaler)
    if not skipped and (step + 1) % config.teacher_sync_steps == 0:
        teacher.update()
    elapsed = time.perf_counter() - t0
    prompts_seen = (step + 1) * config.per_device_train_batch_size * config.gradient_accumulation_steps * world.size
    return {
        "step": step + 1,
        "epoch": prompts_seen / len(encoded),  # as the Trainer counts it: passes over the training prompts
        "loss": loss,
        "divergence": config.divergence,
        "grad_norm": grad_norm,
        "skipped": skipped,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "learning_rate": optimizer.param_groups[0]["lr"],
        "mean_completion_length": sum(completion_lengths) / max(len(completion_lengths), 1),
        "shortest_completion": min(completion_lengths, default=0),
        "longest_completion": max(completion_lengths, default=0),
        "clipped_ratio": sum(n >= config.max_completion_length for n in completion_lengths)
        / max(len(completion_lengths), 1),
        **terminated_lengths(completion_lengths, config.max_completion_length),
        "tokens_processed": int(all_reduce_sum(sum(passes), world)),  # every process's passes
        "tokens_processed_unshared": int(all_reduce_sum(naive_tokens, world)),
        "peak_memory_mib": peak_memory_mib(run.device),
        "seconds": elapsed,
        "rollout_seconds": t_rollouts - t0,  # generation
        "loss_seconds": t_loss - t_rollouts,  # student and teacher passes, the fused loss, the backward
        **scale,
    }
