"""The optimizer loop shared by SDFT and the SFT baseline: resume, steps, metrics, checkpoints, evaluations,
the final model; and what one step does after its loss (clip, non-finite checks, update)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft.config import SDFTConfig
from sdft.data.examples import data_fingerprint
from sdft.run.best import BestWeights, Ranking
from sdft.run.checkpoint import load_checkpoint, newest_intact, resume_note, save_checkpoint
from sdft.run.errors import NonFiniteError, OutOfMemory
from sdft.run.evaluator import Evaluator
from sdft.run.export import export_model
from sdft.run.metrics import MetricsLog, logs_step
from sdft.run.prepare import Run, end_run, start_runner
from sdft.run.reporting import Reporters, logged_record
from sdft.run.run_dir import (
    FINAL_MODEL,
    METRICS_FILE,
    report_line,
    start_run,
)
from sdft.run.schedule import LRSchedule
from sdft.run.writes import WriteError
from sdft.runtime.distributed import World, all_reduce_sum, barrier
from sdft.runtime.optimizer import OptimizerSettings, make_optimizer
from sdft.runtime.parallel import grad_norm_value
from sdft.runtime.precision import compute_precision


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    step: int
    metrics: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    evaluations: list[dict] = field(default_factory=list)  # eval.json records (config.eval_data)
    best_step: int | None = None  # load_best_model_at_end: the step whose weights the run ended on


def _newest(output_dir) -> Path | None:
    """The checkpoint a resume would continue from, for the line a stopped run prints (damage unreported)."""
    return newest_intact(output_dir, report=lambda message: None)


def out_of_memory_line(err: BaseException, step: int, config, output_dir, reduced: bool) -> str:
    """What a step's ``torch.OutOfMemoryError`` says to a user: the step, the sizes that set its memory, the
    switches that cut it (``reduced``: mixed precision is on already), and the checkpoint a resume continues from."""
    newest = _newest(output_dir)
    kept = (f"{newest} is the newest checkpoint ({resume_note(newest)})" if newest is not None
            else "no checkpoint was written yet")
    cuts = [f"per_device_train_batch_size={config.per_device_train_batch_size}",
            f"num_generations={config.num_generations}", f"max_completion_length={config.max_completion_length}"]
    switches = [s for s, on in (("gradient_checkpointing=true", config.gradient_checkpointing),
                                ("mixed_precision=bf16", reduced)) if not on]
    return (f"out of memory in step {step}: lower {', '.join(cuts)}" + (f", or set {' / '.join(switches)}"
            if switches else "") + f"; {kept} ({str(err).splitlines()[0][:160]})")


def batch_indices(step: int, micro: int, n: int, config: SDFTConfig, world: World = World()) -> list[int]:
    """Prompts of one micro-step of this process: a fresh seeded shuffle each epoch, so a resumed run
    sees the same order; process r of W takes the r-th slice of the W * batch prompts of the micro-step."""
    per_step = config.per_device_train_batch_size
    start = ((step * config.gradient_accumulation_steps + micro) * world.size + world.rank) * per_step
    seed = config.data_seed if config.data_seed >= 0 else config.seed
    out = []
    for k in range(start, start + per_step):
        epoch, pos = divmod(k, n)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(order[pos])
    return out


def clip_and_step(model, optimizer, config, step: int, loss: float, scaler=None) -> tuple[float, bool]:
    """Unscale, clip, check, update: (grad norm, skipped). A non-finite loss or norm never reaches the
    weights. ``scaler``: the run's loss scaler (``Runner.scaler``; None or disabled outside fp16); under
    fp16 a finite loss whose gradients overflow is the scale's doing, not the model's: the step is skipped
    and the scale halved, as the HF Trainer does, until the scale is down to 1."""
    scaler = scaler if scaler is not None else _NO_SCALER
    scaler.unscale_(optimizer)  # the clip, the norm and the check see the true gradients
    grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                               config.max_grad_norm or math.inf))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    scale = scaler.get_scale()  # 1.0 when disabled
    overflow = not finite and math.isfinite(loss) and scaler.is_enabled() and scale > 1
    if finite:  # checked here already: the optimizer steps on the unscaled gradients without the scaler's check
        optimizer.step()
    scaler.update()  # fp16: halves the scale after an overflow (recorded by unscale_), else counts to its growth
    optimizer.zero_grad(set_to_none=True)  # frees the gradients before rollouts and checkpoints
    if finite:
        return grad_norm, False
    if overflow or config.nonfinite == "skip":
        return grad_norm, True
    fp16 = (f"; under fp16 they overflow even at loss scale {scale:g}: mixed_precision=bf16 or no "
            "keeps fp32's range") if scaler.is_enabled() and math.isfinite(loss) else ""
    raise NonFiniteError(f"step {step + 1}: loss {loss} and gradient norm {grad_norm} must be finite; stopped "
                         f"before the update, the last checkpoint is intact (nonfinite=skip skips such steps){fp16}")


_NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def run_steps(run: Run, step_fn, teacher=None, step_callback=None, desc="sdft", eval_callback=None,
              eval_loss=None) -> TrainResult:
    """The optimizer loop shared by SDFT and the SFT baseline: resume, steps, metrics, checkpoints.

    ``step_fn(optimizer, step)`` runs one optimizer step and returns its metrics record. ``teacher``
    (SDFT only; None for SFT) is checkpointed and restored with the model. ``eval_loss(model, examples, found,
    progress=)``: the held-out loss each evaluation adds (SDFT's; not under FSDP2).
    """
    try:
        return _run_steps(run, step_fn, teacher, step_callback, desc, eval_callback, eval_loss)
    finally:
        end_run(run.on_end)


def _run_steps(run: Run, step_fn, teacher, step_callback, desc, eval_callback, eval_loss) -> TrainResult:
    config, model, world = run.config, run.model, run.world
    runner = run.runner or start_runner(run, teacher)
    out = Path(config.output_dir)
    data = data_fingerprint(run.examples)
    main = world.is_main
    if main:
        start_run(config, run.resume, evaluating=run.eval_examples is not None, data=data, processes=world.size)
    barrier(world)
    optimizer = make_optimizer(model, OptimizerSettings.from_config(config))
    schedule = LRSchedule.from_config(config)
    log = MetricsLog(out / METRICS_FILE)
    start = 0 if run.resume is None else load_checkpoint(run.resume, model, optimizer, teacher, runner.scaler)
    if start >= config.max_steps and main:
        report_line(f"sdft: {run.resume} is at step {start}, max_steps={config.max_steps}: nothing left to train "
                    "(raise max_steps to continue)")
    if main:
        log.truncate(start)
    reporters = Reporters(config.report_to if main else ["none"], out, config.to_dict())
    evaluator = None  # under FSDP2 every process generates (the weights are sharded), process 0 writes
    best = BestWeights(out, config.metric_for_best_model, write=main) if config.load_best_model_at_end else None
    # save_strategy=best: the evaluations during training that decide a checkpoint (not the one before training,
    # as HF's eval_on_start; load_best_model_at_end ranks that one too)
    saves_best = Ranking(config.metric_for_best_model) if config.save_strategy == "best" else None

    def evaluate_at(step: int) -> bool:
        """Evaluate; whether save_strategy=best checkpoints this step."""
        record = runner(evaluator, run.tokenizer, step)
        reporters.eval(record)
        if best is not None:
            best.offer(step, record, model)
        if eval_callback is not None and main:
            eval_callback(step, record)
        return saves_best is not None and step > 0 and saves_best.offer(step, record)

    try:  # a Ctrl-C from the first evaluation on is reported alike
        if (run.eval_examples is not None or run.retention is not None) and (main or runner.sharded):
            evaluator = Evaluator(run.eval_examples, run.eval_scorer, config.eval_tokens, out, write=main,
                                  retention=run.retention, loss=None if runner.sharded else eval_loss,
                                  progress=config.progress_bar and main)
            evaluator.truncate(start)
            if start == 0:
                evaluate_at(0)
            elif best is not None and best.step is None:  # resumed past a pick that was set aside: rank from here
                for record in (r for r in evaluator.records if r["step"] == start):
                    best.offer(start, record, model)
            if saves_best is not None:  # resumed: the evaluations up to the checkpoint rank as before
                for record in evaluator.records:
                    if 0 < record["step"] <= start:
                        saves_best.offer(record["step"], record)
        history = []
        done = {"save": None, "eval": None}  # the last step checkpointed / evaluated

        def save(step: int):
            if done["save"] == step:
                return
            if main or runner.sharded:  # sharded: every process gathers, process 0 writes
                save_checkpoint(out, step, model, optimizer, teacher, config, config.save_total_limit,
                                run.model_source, write=main, data=data, processes=world.size,
                                scaler=runner.scaler, only_model=config.save_only_model)
            barrier(world)
            done["save"] = step

        def settle(step: int, final: bool):
            """The checkpoint and the evaluation due after ``step``, each once; ``final`` (the last step, or a
            stop asked by ``step_callback``) makes both due (save_strategy=best: a checkpoint after an
            evaluation that is the best so far, and no other)."""
            if save_due(step, final, config, len(run.examples), world.size):
                save(step)
            if done["eval"] != step and eval_due(step, final, config, len(run.examples), world.size):
                new_best = evaluator is not None and evaluate_at(step)  # DDP: process 0 alone evaluates
                done["eval"] = step
                if saves_best is not None and all_reduce_sum(float(main and new_best), world) > 0:
                    save(step)  # every process takes part in a checkpoint: process 0's ranking decides

        bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, desc=desc,
                   disable=not (config.progress_bar and main))
        for step in bar:
            schedule.apply(optimizer, step)
            try:
                record = step_fn(optimizer, step)
            except torch.OutOfMemoryError as err:
                reduced = compute_precision(config.mixed_precision, run.device) != "no"
                raise OutOfMemory(out_of_memory_line(err, step + 1, config, out, reduced)) from err
            history.append(record)
            if main and logs_step(step + 1, config.logging_steps, config.logging_first_step):
                log.write(logged_record(record))
                reporters.train(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            settle(step + 1, final=step + 1 == config.max_steps)
            if step_callback is not None and step_callback(step + 1, record) is True:
                settle(step + 1, final=True)
                break
    except KeyboardInterrupt as err:
        if main:
            report_line(interrupted_line(out))
        err.sdft_reported = True  # the CLI adds no second line
        raise
    finally:
        reporters.close()
    selected = _load_best(run, best, history[-1]["step"] if history else start)
    if config.save_final_model and (main or runner.sharded):
        plain = runner.full_model()  # sharded: gathered by every process, None except on process 0
        if main:
            _write_final(plain, run.tokenizer, out, config.merge_lora, selected)
    barrier(world)
    return TrainResult(model, run.tokenizer, history[-1]["step"] if history else start, history, out,
                       evaluator.records if evaluator is not None else [], selected)


def _write_final(model, tokenizer, out: Path, merge_lora: bool, selected: int | None):
    """``final_model/`` (ours: run_dir owns it); a failed write names the checkpoint that holds the weights."""
    try:
        export_model(model, tokenizer, out / FINAL_MODEL, merge_lora, force=True)
    except WriteError as err:
        newest = _newest(out)
        if newest is None:
            raise
        which = "the last step's weights, not the best evaluation's" if selected is not None else "the trained weights"
        merge = " --merge" if merge_lora else ""
        raise WriteError(f"{err}. {newest} holds {which}: `sdft export {newest} {out / FINAL_MODEL}{merge}` writes "
                         "the model once there is room") from None


def epoch_ends(step: int, config, rows: int, processes: int) -> bool:
    """Whether optimizer step ``step`` (counted from 1) completes a pass over the ``rows`` training rows: the HF
    Trainer's epoch end. sdft's data order runs on from one pass into the next, so the step whose prompts reach
    a multiple of the rows ends that epoch."""
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * processes
    return step * per_step // rows > (step - 1) * per_step // rows


def _due(step: int, final: bool, strategy: str, every: int, config, rows: int, processes: int) -> bool:
    """Whether a save or an evaluation under ``strategy`` falls after optimizer step ``step``: at the last step,
    every ``every`` steps (steps; none when 0) or at each epoch's end (epoch)."""
    if final:
        return True
    if strategy == "epoch":
        return epoch_ends(step, config, rows, processes)
    return bool(every) and step % every == 0


def save_due(step: int, final: bool, config, rows: int, processes: int) -> bool:
    """Whether a checkpoint is written after optimizer step ``step`` (``save_strategy=no``: never; ``best``: after
    an evaluation, by its rank)."""
    return config.save_strategy not in ("no", "best") and _due(step, final, config.save_strategy, config.save_steps,
                                                               config, rows, processes)


def eval_due(step: int, final: bool, config, rows: int, processes: int) -> bool:
    """Whether the run evaluates after optimizer step ``step`` (``eval_strategy``, ``eval_steps``)."""
    return _due(step, final, config.eval_strategy, config.eval_steps, config, rows, processes)


def interrupted_line(output_dir: Path) -> str:
    """What a Ctrl-C leaves: the checkpoint a resume continues from (the steps after it are lost), or none."""
    newest = _newest(output_dir)
    if newest is None:
        return (f"sdft: interrupted before the first checkpoint of {output_dir}: nothing to resume, a rerun "
                "starts afresh")
    return f"sdft: interrupted; {newest} is the newest checkpoint: {resume_note(newest)} (the steps after it are lost)"


def _load_best(run: Run, best: BestWeights | None, last_step: int) -> int | None:
    """``load_best_model_at_end``: every process puts the best evaluation's weights into the model (read
    from what process 0 wrote); the selected step."""
    if best is None:
        return None
    barrier(run.world)
    selected = best.restore(run.model, last_step)
    if selected is not None and run.world.is_main:
        report_line(f"sdft: ending on the weights of step {selected} (best {best.metric}"
                    + (f" {best.value:.4g})" if best.value is not None else ")"))
    return selected
