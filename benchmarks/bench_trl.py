"""Whole SDFT steps, side by side: ``sdft.train`` vs TRL's ``SDFTTrainer`` (and our SFT step).

    pip install trl                       # a benchmark extra, never a runtime dependency
    python benchmarks/bench_trl.py        # all settings; --settings short_g4 ... to pick

Same model (the embedded SmolLM2-135M-Instruct, saved once as a local HF folder so TRL can load it by
path), same data, same G, same completion budget, same loss (full-vocabulary forward KL: TRL
``distillation_mode="full_logits", distillation_alpha=0`` <-> ours ``divergence="forward_kl"``; frozen
teacher: TRL ``teacher_model_kind="base"`` <-> ours ``teacher_mode="frozen"``; the same teacher
template ``"{prompt}\\n\\n{demonstration}"``), same AdamW and learning rate,
fp32 on CPU and bf16 autocast on CUDA (``--precision``). TRL runs with its default gradient
checkpointing; our ``sdft`` side runs without it (our default) and ``sdft_gc`` with it. Each side runs
in its own process; seconds per optimizer step exclude loading and the first step; peak memory
is the process's peak resident set (CPU) or peak allocated memory (CUDA). Settings:

* ``short``: the bundled tool-call prompts (about 30 prompt tokens), G = 4 and 8.
* ``long``: the same requests under a ~930-token tool catalogue as system message (as ToolAlpaca
  does), demonstrations of at least 64 tokens, G = 4 and 8.
* ``shared``: 4 or 8 prompts per step, all under one ~530-token system message (the catalogue's
  first 21 lines), G = 4 and 8: what the batch-wide prefix tree shares across prompts.

Writes benchmarks/results/trl_step_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import environment, markdown_table, run_in_subprocess, write_results  # noqa: E402

COMPLETION = 24
LR = 1e-5
TEMPLATE = "{prompt}\n\n{demonstration}"
SETTINGS = {"short_g4": ("short", 4, 2), "short_g8": ("short", 8, 2), "long_g4": ("long", 4, 2),
            "long_g8": ("long", 8, 2), "shared_p4_g4": ("shared", 4, 4), "shared_p4_g8": ("shared", 8, 4),
            "shared_p8_g4": ("shared", 4, 8), "shared_p8_g8": ("shared", 8, 8)}
DEFAULT_SETTINGS = ["short_g4", "short_g8", "long_g4", "long_g8"]
SHARED_LINES = 21  # the catalogue's first 21 lines: 529 tokens
MODEL_DIR = Path.home() / ".cache" / "sdft" / "smollm2-135m-instruct-hf"


def tool_catalogue(keep: int | None = None) -> str:
    """A deterministic ~930-token catalogue of tools, the long system message (its first ``keep`` lines)."""
    lines = ["You are an assistant that answers every request with exactly one JSON tool call.",
             "Available tools:"]
    verbs = ["look up", "schedule", "cancel", "convert", "translate", "summarise", "order", "track"]
    things = ["flights", "hotel rooms", "currency amounts", "calendar events", "parcels", "recipes",
              "news articles", "train tickets"]
    for i, (verb, thing) in enumerate((v, t) for v in verbs for t in things[:4]):
        lines.append(f"- tool_{i}_{verb.replace(' ', '_')}: {verb} {thing}; arguments: query (string), "
                     f"limit (integer, default {i % 5 + 1}).")
    from sdft.data.skill import TOOLS

    for tool, (arg, _) in TOOLS.items():
        lines.append(f"- {tool}: arguments: {arg}.")
    return "\n".join(lines[:keep])


def rows(setting: str) -> list[dict]:
    """(prompt messages, demonstration) rows of one setting, in TRL's and our column names."""
    from sdft.data.skill import load_skill

    out = []
    for row in load_skill("train"):
        messages = [{"role": "user", "content": row["prompt"]}]
        demo = row["demonstration"]
        if setting == "shared":
            messages = [{"role": "system", "content": tool_catalogue(SHARED_LINES)}] + messages
        if setting == "long":
            messages = [{"role": "system", "content": tool_catalogue()}] + messages
            demo = (f"{demo}\nI picked this tool because the request names its argument directly, and no "
                    "other tool in the catalogue takes that kind of value; the argument is copied from "
                    "the request exactly as written, without any conversion or extra fields, so the call "
                    "can run as it is.")
        out.append({"prompt": messages, "demonstration": demo})
    return out


def model_dir() -> str:
    """The model every side loads: ``SDFT_BENCH_MODEL`` (an HF folder, e.g. ``random_model.py``'s on a
    machine without the embedded model), else the embedded model as a local HF folder (made once)."""
    if os.environ.get("SDFT_BENCH_MODEL"):
        return os.environ["SDFT_BENCH_MODEL"]
    if not (MODEL_DIR / "config.json").exists():
        from sdft import load_model
        from sdft.run.export import save_hf_folder

        save_hf_folder(*load_model(), MODEL_DIR)
    return str(MODEL_DIR)


def _peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _summary(seconds: list[float], extra: dict) -> dict:
    measured = seconds[1:]  # the first step warms caches and allocators
    return {"seconds_per_step": statistics.median(measured), "step_seconds": seconds,
            "peak_memory_mib": _peak_mib(), **extra}


def _plan(config, data, tokenizer) -> dict:
    """The dry run's memory plan for this run (``sdft.run.memory_plan``: training state before activations, the
    rollouts' KV cache, and the scoring pass's activations, ``sdft.run.activation_plan``), in MiB, to set beside
    the peak the run reaches."""
    from sdft.data.examples import load_examples
    from sdft.run.activation_plan import scoring_plan
    from sdft.run.dry_run import meta_model
    from sdft.run.memory_plan import rollout_plan, training_state
    from sdft.run.trainer import encode_examples
    from sdft.runtime.inference import run_device

    device = run_device(config.device)
    meta = meta_model(model_dir())
    state = training_state(meta, config, 1, device)
    encoded = encode_examples(load_examples(data), tokenizer, config)
    prompts = [e.prompt_ids.tolist() for e in encoded]
    cache = rollout_plan(meta, prompts, config, device)
    scoring = scoring_plan(meta, prompts, config, device, [e.teacher_ids.tolist() for e in encoded])
    return {"plan_state_mib": state.total / 2**20, "plan_rollout_cache_mib": (cache.total if cache else 0) / 2**20,
            "plan_scoring_mib": (scoring.total if scoring else 0) / 2**20}


def run_sdft(setting: str, group: int, prompts: int, steps: int, method: str = "sdft",
             teacher: str = "frozen", precision: str = "no", dtype: str = "float32") -> dict:
    """Our side (weights loaded in ``dtype``): ``sdft.train`` (``sdft_gc``: with gradient checkpointing,
    TRL's default; ``sft``:
    ``sdft.train_sft``; ``sdft_joint``: ``share_teacher_prefix=True``, a live teacher in one tree with
    the student where the node count says it pays; ``sdft_nojoint``: never; ``sdft_notrim`` /
    ``sdft_gc_notrim``: ``cpu_trim_memory=False``, freed heap memory kept resident) for ``steps``
    optimizer steps.
    ``trl_step_live_cpu`` was measured while the joint pass was the default: its ``sdft`` side is
    today's ``sdft_joint``."""
    import tempfile

    import sdft

    torch.manual_seed(0)
    data = rows(setting)
    scratch = tempfile.TemporaryDirectory()  # the run's final checkpoint (1.6 GB) goes with it
    config = sdft.SDFTConfig(
        output_dir=scratch.name, max_steps=steps, per_device_train_batch_size=prompts,
        num_generations=group, max_completion_length=COMPLETION, max_prompt_length=2048, learning_rate=LR,
        divergence="forward_kl", teacher_mode=teacher, teacher_template=TEMPLATE, save_steps=10**6,
        progress_bar=False, temperature=1.0, save_final_model=False,
        gradient_checkpointing=method.startswith("sdft_gc"), share_teacher_prefix=method == "sdft_joint",
        cpu_trim_memory=not method.endswith("_notrim"), mixed_precision=precision, dtype=dtype)
    model, tokenizer = sdft.load_model(model_dir(), getattr(torch, dtype))
    plan = _plan(config, data, tokenizer) if method != "sft" else {}
    fn = sdft.train_sft if method == "sft" else sdft.train
    result = fn(model, data, config, tokenizer=tokenizer)
    records = result.metrics
    scratch.cleanup()
    return _summary([r["seconds"] for r in records],
                    {"tokens_per_step": statistics.mean(r["tokens"] for r in records),
                     "tokens_processed": records[-1].get("tokens_processed"),
                     "tokens_processed_unshared": records[-1].get("tokens_processed_unshared"),
                     "loss": records[-1]["loss"], **plan})


def run_trl(setting: str, group: int, prompts: int, steps: int, fused: bool | str = False,
            teacher: str = "frozen", precision: str = "no") -> dict:
    """TRL's side: ``trl.experimental.sdft.SDFTTrainer`` with the matching configuration (``fused``:
    the same trainer with sdft's fused loss, ``sdft.integrations.trl_loss.FusedSDFTTrainer``;
    ``"dropin"``: the same script with the one import switched to ``sdft.integrations.trl.SDFTTrainer``,
    which refuses ``save_strategy="no"`` and so writes its one checkpoint at the end, untimed)."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    torch.manual_seed(0)
    data = Dataset.from_list([{"prompt": r["prompt"], "privileged_context": r["demonstration"]}
                              for r in rows(setting)])
    scratch = tempfile.TemporaryDirectory()
    args = SDFTConfig(
        output_dir=scratch.name,
        max_steps=steps,
        per_device_train_batch_size=prompts * group,
        gradient_accumulation_steps=1,
        num_generations=group,
        max_completion_length=COMPLETION,
        max_prompt_length=None,
        learning_rate=LR,
        distillation_mode="full_logits",
        distillation_alpha=0.0,
        teacher_model_kind={"frozen": "base", "live": "live"}[teacher],
        teacher_prompt_template="{prompt}\n\n{privileged_context}",
        distillation_is_clip=None,
        num_loss_tokens_to_skip=0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        report_to="none",
        save_strategy="steps" if fused == "dropin" else "no",
        save_steps=10**6,
        logging_steps=1,
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=0,
        disable_tqdm=True,
    )
    seconds = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            seconds.append(time.perf_counter() - self.t0)

    path = model_dir()
    if fused == "dropin":
        from sdft.integrations.trl import SDFTTrainer  # the one-import switch
    elif fused:
        from sdft.integrations.trl_loss import FusedSDFTTrainer as SDFTTrainer  # noqa: N814
    trainer = SDFTTrainer(model=path, args=args, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(path), callbacks=[Timer()])
    trainer.train()
    scratch.cleanup()
    if fused == "dropin":  # sdft's loop has no on_step_begin: its own step times, from the log history
        seconds = [h["sdft/step_seconds"] for h in trainer.state.log_history if "sdft/step_seconds" in h]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _summary(seconds, {"loss": losses[-1] if losses else None})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    p.add_argument("--sides", nargs="+", default=["trl", "sdft", "sft"],
                   choices=["trl", "trl_fused", "trl_dropin", "sdft", "sdft_gc", "sdft_joint", "sdft_nojoint",
                            "sdft_notrim", "sdft_gc_notrim", "sft"])
    p.add_argument("--teacher", choices=["frozen", "live"], default="frozen",
                   help="frozen: TRL's base <-> our frozen; live: the current weights on both sides")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not counted)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16" if torch.cuda.is_available() else "no",
                   help="every side's: TRL's bf16=True (fp16=True) <-> our mixed_precision=bf16 (fp16) (default: bf16 "
                   "on CUDA)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    model_dir()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    results = []
    for name in args.settings:
        setting, group, prompts = SETTINGS[name]
        row = {"setting": name, "G": group, "prompts_per_step": prompts}
        for side in args.sides:
            trl_sides = {"trl": ("run_trl", (False,)), "trl_fused": ("run_trl", (True,)),
                         "trl_dropin": ("run_trl", ("dropin",))}
            fn, extra = trl_sides.get(side, ("run_sdft", (side,)))
            extra = (*extra, args.teacher, args.precision)
            out = run_in_subprocess("benchmarks.bench_trl", fn, setting, group, prompts, args.steps, *extra)
            print(name, side, json.dumps(out), flush=True)
            row[side] = out
        results.append(row)
    table = []
    for r in results:
        line = {"setting": r["setting"], "prompts": r["prompts_per_step"], "G": r["G"]}
        for side in args.sides:
            line[f"{side}_s_per_step"] = r[side]["seconds_per_step"]
            line[f"{side}_peak_mib"] = r[side]["peak_memory_mib"]
        for ours in ("sdft", "sdft_gc", "sdft_joint", "sdft_nojoint", "sdft_notrim", "sdft_gc_notrim", "trl_fused"):
            if "trl" in r and ours in r:
                line[f"{ours}_speedup_vs_trl"] = r["trl"]["seconds_per_step"] / r[ours]["seconds_per_step"]
                line[f"{ours}_memory_vs_trl"] = r[ours]["peak_memory_mib"] / r["trl"]["peak_memory_mib"]
        if "sdft" in r and "plan_state_mib" in r["sdft"]:  # the dry run's plan: state + the larger transient
            line["sdft_plan_mib"] = r["sdft"]["plan_state_mib"] + max(r["sdft"]["plan_rollout_cache_mib"],
                                                                      r["sdft"].get("plan_scoring_mib", 0))
        if "sdft" in r and r["sdft"].get("tokens_processed"):
            line["sdft_token_passes_vs_unshared"] = (r["sdft"]["tokens_processed"]
                                                     / r["sdft"]["tokens_processed_unshared"])
        if "sdft_joint" in r and "sdft" in r:
            line["teacher_student_share_speedup"] = (r["sdft"]["seconds_per_step"]
                                                     / r["sdft_joint"]["seconds_per_step"])
        elif "sdft_nojoint" in r and "sdft" in r:
            line["teacher_student_share_speedup"] = (r["sdft_nojoint"]["seconds_per_step"]
                                                     / r["sdft"]["seconds_per_step"])
        for ours in ("sdft", "sdft_gc"):
            if f"{ours}_notrim" in r and ours in r:
                line[f"{ours}_trim_memory_ratio"] = (r[ours]["peak_memory_mib"]
                                                     / r[f"{ours}_notrim"]["peak_memory_mib"])
                line[f"{ours}_trim_speedup"] = (r[f"{ours}_notrim"]["seconds_per_step"]
                                                / r[ours]["seconds_per_step"])
        if "sft" in r and "sdft" in r:
            line["sdft_over_sft"] = r["sdft"]["seconds_per_step"] / r["sft"]["seconds_per_step"]
        table.append(line)
    tag = "gpu" if device.type == "cuda" else "cpu"
    header = (f"# Whole SDFT step: sdft.train vs TRL SDFTTrainer\n\nEnvironment: {env}. "
              f"Prompts per step as in the table, at most {COMPLETION} completion tokens, forward KL over "
              f"the full vocabulary, {args.teacher} teacher, mixed precision {args.precision}, AdamW lr {LR}; "
              f"median seconds per optimizer step over "
              f"steps 2..{args.steps}; peak memory of each side's process.\n\n"
              f"Command: `python benchmarks/bench_trl.py {' '.join(argv or sys.argv[1:])}`\n\n")
    write_results(args.out, args.stem or f"trl_step_{tag}", {"environment": env, "rows": results},
                  header + markdown_table(table, list(table[0])))


if __name__ == "__main__":
    main()
