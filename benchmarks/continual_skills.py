"""The README's continual-learning run: ``sdft continual`` on the embedded SmolLM2-135M-Instruct, the
three benchmark skills in turn (JSON tool calls, shopping lists as JSON, hashtags; each under its own
system message), SDFT against the SFT baseline, as a user runs it.

    python benchmarks/continual_skills.py --stem continual_cpu

Writes the skills' train and held-out files (``benchmarks/forgetting_skills``: 24 held-out prompts
each) into a temporary folder, runs the command below in a fresh output_dir and keeps both matrices,
the side-by-side heatmap and the command in ``benchmarks/results/<stem>.{md,json,png}``. Settings as
the forgetting benchmark's sequential run: 40 steps a stage, 2 prompts a step, lr 3e-5, forward KL
over the full vocabulary, 4 rollouts of at most 24 tokens, the frozen teacher with the ``fewshot``
template, seed 0; no model selection (each stage ends at its last step).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.forgetting_skills import all_skills  # noqa: E402
from benchmarks.measure import environment, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCORERS = {"tool_calls": "json", "shopping_list": "json", "hashtags": "exact"}
SETTINGS = ["max_steps=40", "per_device_train_batch_size=2", "learning_rate=3e-5", "divergence=forward_kl",
            "num_generations=4", "max_completion_length=24", "teacher_mode=frozen", "teacher_template=fewshot",
            "seed=0", "save_total_limit=1", "progress_bar=false"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-limit", type=int, default=24)
    p.add_argument("--stem", default="continual_cpu")
    args = p.parse_args(argv)
    import torch

    settings = [s if not s.startswith("max_steps=") else f"max_steps={args.steps}" for s in SETTINGS]
    with tempfile.TemporaryDirectory() as tmp:
        stages, evals = [], []
        for skill in all_skills():
            for rows, kind, into in ((skill.train, "train", stages), (skill.eval[:args.eval_limit], "eval", evals)):
                path = Path(tmp) / ("" if kind == "train" else "eval") / f"{skill.name}.jsonl"
                path.parent.mkdir(exist_ok=True)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                into.append(str(path))
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "sdft.cli", "continual", "--stages", *stages, "--eval-stages", *evals,
                   "--baseline", "sft", "--scorer", *SCORERS.values(), "--set", f"output_dir={out}", *settings]
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"sdft continual failed ({done.returncode}): {done.stderr[-3000:]}")
        matrices = {m: json.loads((out / m / "sequence.json").read_text()) for m in ("sdft", "sft")}
        tables = (out / "sdft-vs-sft.md").read_text()
        png = ROOT / "benchmarks" / "results" / f"{args.stem}.png"
        shutil.copyfile(out / "sdft-vs-sft.png", png)
    shown = ["sdft", "continual", "--stages", *(f"{n}.jsonl" for n in SCORERS), "--eval-stages",
             *(f"eval/{n}.jsonl" for n in SCORERS), "--baseline", "sft", "--scorer", *SCORERS.values(), "--set",
             *settings]
    env = environment(torch.device("cpu"))
    text = (f"# Three skills in turn, SDFT vs SFT (`sdft continual`)\n\n{env}. Command: "
            f"`python benchmarks/continual_skills.py {' '.join(argv or sys.argv[1:])}`, which runs\n\n"
            f"    {' '.join(shown)}\n\non the embedded SmolLM2-135M-Instruct ({seconds:.0f} s in all). Each "
            "row: the held-out score of every skill (24 prompts each, greedy) and `retention`, the share of "
            "the bundled general probe (103 questions the base model answers right) still answered, after "
            "that stage; `text_perplexity`: held-out plain text.\n\n" + tables +
            f"\n![heatmap]({args.stem}.png)\n")
    write_results(ROOT / "benchmarks" / "results", args.stem,
                  {"environment": env, "command": shown, "seconds": seconds, "matrices": matrices,
                   "stdout": done.stdout[-5000:]}, text)


if __name__ == "__main__":
    main()
