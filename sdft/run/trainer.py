"""``sdft.train``: on-policy self-distillation fine-tuning.

Each optimizer step: for every prompt in the micro-batch sample G rollouts from the student, score
their tokens with the teacher (the model with the demonstration in context, no gradient), and
minimise the per-token divergence with the fused LM-head kernel. Prompt and teacher context are
computed once per prompt and shared by the G rollouts (``share_prefix``).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft.config import SDFTConfig
from sdft.data.chat import chat_ids, has_chat_template
from sdft.data.examples import Example, data_fingerprint, load_examples
from sdft.data.templates import teacher_messages
from sdft.eval import retention
from sdft.eval.scorers import get_scorer
from sdft.loss.batch import BatchLoss
from sdft.loss.teacher import Teacher
from sdft.models import enable_checkpointing, load_model, output_layer
from sdft.models.attention import use_implementation
from sdft.models.head import verify_head
from sdft.models.loading import is_embedded, load_tokenizer, model_source
from sdft.models.lora import LoraSettings, apply_lora
from sdft.prefix.packed import tokens_processed
from sdft.rollout.checks import check_engine, check_rollouts
from sdft.rollout.engine import HFRolloutEngine, RolloutEngine
from sdft.run.best import BestWeights
from sdft.run.checkpoint import load_checkpoint, newest_intact, save_checkpoint
from sdft.run.evaluator import Evaluator
from sdft.run.export import export_model
from sdft.run.lock import RunLock, RunLockedError
from sdft.run.metrics import MetricsLog, peak_memory_mib
from sdft.run.reporting import Reporters, check_backends, logged_record
from sdft.run.run_dir import (
    FINAL_MODEL,
    METRICS_FILE,
    check_model_folder,
    check_run_model,
    plan_run,
    report_line,
    start_run,
)
from sdft.run.writes import WriteError
from sdft.runtime.determinism import deterministic_algorithms
from sdft.runtime.distributed import World, all_reduce_sum, barrier, setup, step_seed
from sdft.runtime.parallel import Runner, compute_precision, grad_norm_value, run_device


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    step: int
    metrics: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    evaluations: list[dict] = field(default_factory=list)  # eval.json records (config.eval_data)
    best_step: int | None = None  # load_best_model_at_end: the step whose weights the run ended on


@dataclass
class EncodedExample:
    prompt_ids: torch.Tensor
    teacher_ids: torch.Tensor


def encode_examples(examples: list[Example], tokenizer, config: SDFTConfig, device="cpu") -> list[EncodedExample]:
    """Token ids of every prompt and teacher context; too long ones are an error naming the example."""
    encoded = []
    for i, ex in enumerate(examples):
        prompt = chat_ids(tokenizer, ex.messages(), device)
        teacher = chat_ids(tokenizer, teacher_messages(ex.messages(), ex.demonstration, config.teacher_template),
                           device)
        for what, ids in (("prompt", prompt), ("teacher context (prompt + demonstration)", teacher)):
            if ids.numel() > config.max_prompt_length:
                raise ValueError(f"{ex.where or f'example {i}'}: the {what} has {ids.numel()} tokens, over "
                                 f"max_prompt_length={config.max_prompt_length} (raise it, or shorten the row)")
        encoded.append(EncodedExample(prompt, teacher))
    return encoded


def batch_indices(step: int, micro: int, n: int, config: SDFTConfig, world: World = World()) -> list[int]:
    """Prompts of one micro-step of this process: a fresh seeded shuffle each epoch, so a resumed run
    sees the same order; process r of W takes the r-th slice of the W * batch prompts of the micro-step."""
    per_step = config.per_device_train_batch_size
    start = ((step * config.gradient_accumulation_steps + micro) * world.size + world.rank) * per_step
    out = []
    for k in range(start, start + per_step):
        epoch, pos = divmod(k, n)
        order = list(range(n))
        random.Random(config.seed * 100_003 + epoch).shuffle(order)
        out.append(order[pos])
    return out


class NonFiniteError(RuntimeError):
    """The loss or gradient norm of a step was NaN or infinite; the run stopped before updating."""


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
    eval_examples: list[Example] | None = None  # config.eval_data, loaded and checked before the model
    eval_scorer: object = None  # a scorer callable (sdft.eval.scorers)
    world: World = World()  # this process's place under torchrun / accelerate (sdft.runtime.distributed)
    runner: Runner | None = None  # how the model runs here: alone, DDP or FSDP2 (start_runner)
    on_end: list = field(default_factory=list)  # called when run_steps ends: release the lock, restore switches
    retention: object = None  # what the run must keep (sdft.eval.retention.Retention), scored with each evaluation
    encoded: list | None = None  # the rows' token ids on the CPU, as ``prepare``'s ``encode`` gave them


def start_runner(run: Run, teacher=None) -> Runner:
    """Wrap the model for this process (DDP, FSDP2 or alone) once any teacher copy has been made from
    the full weights; a sharded student gets a teacher copy sharded the same way."""
    run.runner = Runner(run.model, run.world, run.config.parallel,
                        compute_precision(run.config.mixed_precision, run.device), run.config.cpu_trim_memory)
    if teacher is not None:
        teacher.distribute(run.runner)
    return run.runner


def prepare(model, dataset, config, tokenizer, eval_scorer=None, eval_dataset=None, encode=None) -> Run:
    """Validate config, data and output_dir (cheap, before any model loads), then load the model.

    ``eval_dataset`` (rows as ``dataset`` takes them) stands in for ``config.eval_data``. ``encode(examples,
    tokenizer, config)``: the rows' token ids on the CPU (``Run.encoded``), taken before the weights load,
    so that a row over the length limits is one line before a large model loads."""
    config = as_config(config)
    check_backends(config.report_to)
    if eval_dataset is not None:
        eval_examples = load_examples(eval_dataset)
    else:
        eval_examples = load_examples(config.eval_data) if config.eval_data else None
    eval_scorer = get_scorer(eval_scorer if eval_scorer is not None else config.eval_scorer)
    kept = retention.resolve(config.retention_data, config.retention_text, config.retention_scorer, is_embedded(model),
                             evaluating=eval_examples is not None, report=report_line)
    if config.load_best_model_at_end:
        check_best_metric(config.metric_for_best_model, eval_examples is not None, kept)
    if model is not None and not isinstance(model, (str, Path, torch.nn.Module)):
        raise TypeError(f"model must be None (the embedded model), a local path or a transformers model, "
                        f"got {type(model).__name__}")
    if model is not None and not isinstance(model, (str, Path)) and tokenizer is None:
        raise ValueError("pass the tokenizer together with a model object")
    if dataset is None:
        from sdft.data.skill import load_skill

        dataset = load_skill("train")
    examples = load_examples(dataset)
    resume = plan_run(config, evaluating=eval_examples is not None)
    check_model_folder(model)
    check_run_model(config, resume, model, evaluating=eval_examples is not None)
    config.check_device()
    world = setup(config.device)
    lock = _take_output_dir(config.output_dir, world)
    on_end = [lock.release] if lock is not None else []
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world.size
    if per_step > len(examples) and world.is_main:
        report_line(f"sdft: a step takes {per_step} prompts (per_device_train_batch_size x "
                    f"gradient_accumulation_steps x processes) from {len(examples)} rows: each step sees some rows "
                    "more than once")
    try:
        on_end.append(deterministic_algorithms(config.full_determinism))
        run = _load(model, tokenizer, config, examples, resume, eval_examples, eval_scorer, world, on_end, encode)
        run.retention = kept
        return run
    except BaseException:
        _finish(on_end)
        raise


def check_best_metric(metric: str, evaluating: bool, kept) -> None:
    """``load_best_model_at_end`` needs an evaluation that yields ``metric``: one line before the model loads."""
    if metric in ("score", "perplexity"):
        if not evaluating:
            raise ValueError(f"load_best_model_at_end ranks the evaluations on eval_data by {metric}: give eval_data")
    elif not (kept is not None and (kept.examples if metric == "retention_score" else kept.texts)):
        source = "retention_data" if metric == "retention_score" else "retention_text"
        raise ValueError(f"metric_for_best_model={metric} needs {source} (and eval_data to evaluate at all)")


def _finish(on_end: list):
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
    encoded = None
    if model is None or isinstance(model, (str, Path)):
        tokenizer = load_tokenizer(model)  # None: the embedded model's first load (its rows are measured after)
        if tokenizer is not None and encode is not None:
            encoded = encode(examples, tokenizer, config)
        model, tokenizer = load_model(model, getattr(torch, config.dtype), tokenizer)
    if encoded is None and encode is not None:
        encoded = encode(examples, tokenizer, config)
    source = model_source(model)  # load_model tags what it loaded; a foreign object is SOURCE_UNKNOWN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not has_chat_template(tokenizer) and world.is_main:
        report_line("sdft: the tokenizer has no chat template (a base model's): prompts and demonstrations are "
                    "plain text, turns joined by blank lines, each demonstration ended with EOS (sdft.data.chat)")
    model.to(device)
    on_end.append(use_implementation(model, config.attn_implementation))  # for the run only
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.disable_dropout:
        disable_dropout(model)
    if config.use_lora:
        model = apply_lora(model, LoraSettings.from_config(config))
    verify_head(model)  # a head sdft cannot express is refused here, before any step
    model.train()
    return Run(config, model, tokenizer, examples, device, resume, source, eval_examples, eval_scorer, world,
               on_end=on_end, encoded=encoded)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each optimizer step: a linear warmup over ``warmup_ratio`` of the steps, then
    constant, linear or cosine decay to 0 at ``max_steps``. A function of the step alone, so a resumed
    run continues the same schedule."""

    learning_rate: float
    kind: str  # constant | linear | cosine
    warmup_ratio: float
    max_steps: int

    @classmethod
    def from_config(cls, config) -> "LRSchedule":
        return cls(config.learning_rate, config.lr_scheduler_type, config.warmup_ratio, config.max_steps)

    def at(self, step: int) -> float:
        """The rate for optimizer step ``step`` (0-based)."""
        warmup = int(math.ceil(self.warmup_ratio * self.max_steps))
        if step < warmup:
            return self.learning_rate * (step + 1) / warmup
        if self.kind == "constant":
            return self.learning_rate
        progress = (step - warmup) / max(self.max_steps - warmup, 1)
        if self.kind == "linear":
            return self.learning_rate * (1.0 - progress)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer, step: int):
        for group in optimizer.param_groups:
            group["lr"] = self.at(step)


def make_optimizer(model, learning_rate: float, weight_decay: float):
    """AdamW over the trainable parameters; the fused kernel (one pass, ~9x faster than the
    for-each one on a 2-core CPU for 135M parameters) wherever torch has it for these tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=fused)


def run_steps(run: Run, step_fn, teacher=None, step_callback=None, desc="sdft", eval_callback=None) -> TrainResult:
    """The optimizer loop shared by SDFT and the SFT baseline: resume, steps, metrics, checkpoints.

    ``step_fn(optimizer, step)`` runs one optimizer step and returns its metrics record. ``teacher``
    (SDFT only; None for SFT) is checkpointed and restored with the model.
    """
    try:
        return _run_steps(run, step_fn, teacher, step_callback, desc, eval_callback)
    finally:
        _finish(run.on_end)


def _run_steps(run: Run, step_fn, teacher, step_callback, desc, eval_callback) -> TrainResult:
    config, model, world = run.config, run.model, run.world
    runner = run.runner or start_runner(run, teacher)
    out = Path(config.output_dir)
    data = data_fingerprint(run.examples)
    main = world.is_main
    if main:
        start_run(config, run.resume, evaluating=run.eval_examples is not None, data=data)
    barrier(world)
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    schedule = LRSchedule.from_config(config)
    log = MetricsLog(out / METRICS_FILE)
    start = 0 if run.resume is None else load_checkpoint(run.resume, model, optimizer, teacher)
    if start >= config.max_steps and main:
        report_line(f"sdft: {run.resume} is at step {start}, max_steps={config.max_steps}: nothing left to train "
                    "(raise max_steps to continue)")
    if main:
        log.truncate(start)
    reporters = Reporters(config.report_to if main else ["none"], out, config.to_dict())
    evaluator = None  # under FSDP2 every process generates (the weights are sharded), process 0 writes
    best = BestWeights(out, config.metric_for_best_model, write=main) if config.load_best_model_at_end else None

    def evaluate_at(step: int):
        record = runner(evaluator, run.tokenizer, step)
        reporters.eval(record)
        if best is not None:
            best.offer(step, record, model)
        if eval_callback is not None and main:
            eval_callback(step, record)

    if (run.eval_examples is not None or run.retention is not None) and (main or runner.sharded):
        evaluator = Evaluator(run.eval_examples, run.eval_scorer, config.eval_tokens, out, write=main,
                              retention=run.retention)
        evaluator.truncate(start)
        if start == 0:
            evaluate_at(0)
        elif best is not None and best.step is None:  # resumed past a pick that was set aside: rank from here
            for record in (r for r in evaluator.records if r["step"] == start):
                best.offer(start, record, model)
    history = []
    done = {"save": None, "eval": None}  # the last step checkpointed / evaluated

    def settle(step: int, final: bool):
        """The checkpoint and the evaluation due after ``step``, each once; ``final`` (the last step, or a
        stop asked by ``step_callback``) makes both due."""
        if (final or step % config.save_steps == 0) and done["save"] != step:
            if main or runner.sharded:  # sharded: every process gathers, process 0 writes
                save_checkpoint(out, step, model, optimizer, teacher, config, config.save_total_limit,
                                run.model_source, write=main, data=data)
            barrier(world)
            done["save"] = step
        if evaluator is not None and done["eval"] != step and (
                final or (config.eval_steps and step % config.eval_steps == 0)):
            evaluate_at(step)
            done["eval"] = step

    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, desc=desc,
               disable=not (config.progress_bar and main))
    try:
        for step in bar:
            schedule.apply(optimizer, step)
            record = step_fn(optimizer, step)
            history.append(record)
            if main and (step + 1) % config.logging_steps == 0:
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
        newest = newest_intact(out, report=lambda message: None)
        if newest is None:
            raise
        which = "the last step's weights, not the best evaluation's" if selected is not None else "the trained weights"
        merge = " --merge" if merge_lora else ""
        raise WriteError(f"{err}. {newest} holds {which}: `sdft export {newest} {out / FINAL_MODEL}{merge}` writes "
                         "the model once there is room") from None


def interrupted_line(output_dir: Path) -> str:
    """What a Ctrl-C leaves: the checkpoint a resume continues from (the steps after it are lost), or none."""
    newest = newest_intact(output_dir, report=lambda message: None)
    if newest is None:
        return (f"sdft: interrupted before the first checkpoint of {output_dir}: nothing to resume, a rerun "
                "starts afresh")
    return (f"sdft: interrupted; {newest} is the newest checkpoint: resume_from_checkpoint=true continues from "
            "it (the steps after it are lost)")


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


def train(model=None, dataset=None, config: SDFTConfig | dict | None = None, tokenizer=None,
          step_callback=None, engine: RolloutEngine | None = None, eval_scorer=None,
          eval_dataset=None, eval_callback=None) -> TrainResult:
    """Fine-tune ``model`` on ``dataset`` (prompt + demonstration rows) with SDFT.

    ``model``: None (embedded SmolLM2-135M-Instruct), a local path, or a transformers model (then
    pass ``tokenizer``). ``dataset``: a .jsonl path, a list of dicts or a HF Dataset; None uses the
    bundled tool-call skill. ``step_callback(step, record)`` is called after each optimizer step; when it
    returns True the run ends there (checkpoint, evaluation and final model as at ``max_steps``).
    ``engine``: the rollout engine (default: batched Hugging Face sampling, ``HFRolloutEngine``).
    ``eval_scorer``: a callable ``(answer, demonstration) -> float`` overriding ``config.eval_scorer``
    for the evaluation on ``config.eval_data``. ``eval_dataset``: held-out rows (as ``dataset``) in place
    of ``config.eval_data``. ``eval_callback(step, record)`` is called after each evaluation (its
    ``eval.json`` record).
    """
    if engine is not None:
        check_engine(engine)
    run = prepare(model, dataset, config, tokenizer, eval_scorer, eval_dataset, encode=encode_examples)
    encoded = [EncodedExample(e.prompt_ids.to(run.device), e.teacher_ids.to(run.device)) for e in run.encoded]
    teacher = Teacher(run.model, run.config.teacher_mode, run.config.ema_decay)
    start_runner(run, teacher)
    engine = engine or HFRolloutEngine(run.tokenizer, run.config.decode_gemm, run.config.tree_attention)
    loss = BatchLoss.from_config(run.config)

    def step_fn(optimizer, step):
        return _train_step(run, teacher, engine, loss, optimizer, encoded, step)

    return run_steps(run, step_fn, teacher, step_callback, eval_callback=eval_callback)


def terminated_lengths(lengths: list[int], limit: int) -> dict:
    """TRL's terminated-length metrics: the lengths of the rollouts that ended before ``limit`` (0 when
    none did, as TRL reports)."""
    ended = [n for n in lengths if n < limit] or [0]
    return {"mean_terminated_length": sum(ended) / len(ended), "shortest_terminated": min(ended),
            "longest_terminated": max(ended)}


def clip_and_step(model, optimizer, config, step: int, loss: float) -> tuple[float, bool]:
    """Clip, check, update: (grad norm, skipped). A non-finite loss or norm never reaches the weights."""
    grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                               config.max_grad_norm))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frees the gradients before rollouts and checkpoints
    if finite:
        return grad_norm, False
    if config.nonfinite == "skip":
        return grad_norm, True
    raise NonFiniteError(f"step {step + 1}: loss {loss} and gradient norm {grad_norm} must be finite; stopped "
                         "before the update, the last checkpoint is intact (nonfinite=skip skips such steps)")


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
    grad_norm, skipped = clip_and_step(model, optimizer, config, step, loss)
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
    }
