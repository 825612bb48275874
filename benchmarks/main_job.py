"""The README's main job, run as a user runs it, so its figures come from the current code.

Runs ``sdft train`` with the README's arguments (and, with ``--eval``, the held-out variant) into a
fresh temporary output_dir, optionally with ``--busy N`` processes keeping the CPU busy, and writes
what it printed plus a summary: skill accuracy before / after, the eval table's score and perplexity,
every step's loss and token count, and wall-clock. Two runs of one seed must agree on every figure
but the times (issue 33); ``--repeat-busy`` reruns the first command beside busy processes and
records whether they did. ``--threads N --compare RESULT.json`` reruns it with another thread count,
which sums in another order: how far the figures move from one machine to another.

    python benchmarks/main_job.py --eval --repeat-busy 2 --stem main_job_cpu
    python benchmarks/main_job.py --threads 1 --compare benchmarks/results/main_job_cpu.json --stem main_job_cpu_1thread

``--precision`` runs the main command three times instead, with ``mixed_precision=no`` (fp32), ``bf16``
and ``fp16`` (autocast on fp32 master weights; fp16 with loss scaling): step time, peak memory, how far
the losses move and how many steps fp16's loss scale skipped.

    python benchmarks/main_job.py --precision --stem main_job_cpu_precision
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import environment, markdown_table, write_results  # noqa: E402

MAIN = ["--set", "max_steps=30", "learning_rate=1e-4", "divergence=forward_kl", "max_completion_length=24"]
EVAL = ["--eval-data", "sdft/data/tool_calls_eval.jsonl", "--scorer", "json"] + MAIN
ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def run_job(args: list[str], busy: int = 0, threads: int | None = None) -> dict:
    """One ``sdft train`` in a fresh output_dir (``threads``: OMP_NUM_THREADS): its summary and lines."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "sdft.cli", "train", *args, f"output_dir={tmp}/out", "progress_bar=false"]
            t0 = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
            seconds = time.perf_counter() - t0
            metrics = [json.loads(line) for line in Path(tmp, "out", "metrics.jsonl").read_text().splitlines()] \
                if Path(tmp, "out", "metrics.jsonl").exists() else []
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if done.returncode != 0:
        raise RuntimeError(f"sdft train failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = {"args": " ".join(args), "busy_processes": busy, "threads": threads, "seconds": round(seconds, 1),
               "losses": [round(r["loss"], 6) for r in metrics], "tokens": [r["sdft/tokens"] for r in metrics],
               "median_step_s": round(sorted(r["sdft/step_seconds"] for r in metrics)[len(metrics) // 2], 2),
               "peak_memory_mib": round(max((r.get("sdft/peak_memory_mib", 0) for r in metrics), default=0)),
               "skipped_steps": sum(bool(r.get("sdft/skipped")) for r in metrics)}
    for line in done.stdout.splitlines():
        m = re.match(r"skill accuracy (before|after): (\{.*\})$", line)
        if m:
            acc = ast.literal_eval(m.group(2))
            summary[f"exact_{m.group(1)}"], summary[f"format_{m.group(1)}"] = acc["exact"], acc["format"]
        m = re.match(r"\s*(\d+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            summary.setdefault("eval", []).append({"step": int(m.group(1)), "score": float(m.group(2)),
                                                   "perplexity": float(m.group(3))})
    summary["stdout"] = done.stdout
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", action="store_true", help="also the README's --eval-data variant")
    parser.add_argument("--repeat-busy", type=int, default=0, metavar="N",
                        help="rerun the main command beside N busy processes and compare")
    parser.add_argument("--threads", type=int, default=None,
                        help="run the main command only, with OMP_NUM_THREADS=N (how far figures move with threads)")
    parser.add_argument("--compare", default=None, metavar="JSON", help="an earlier result to compare figures with")
    parser.add_argument("--precision", action="store_true",
                        help="run the main command with mixed_precision=no, =bf16 and =fp16 (nothing else)")
    parser.add_argument("--stem", default="main_job_cpu")
    args = parser.parse_args(argv)
    import torch

    if args.precision:
        runs = [run_job(MAIN + [f"mixed_precision={p}"]) for p in ("no", "bf16", "fp16")]
        for r in runs[1:]:
            r["max_loss_difference"] = max(abs(a - b) for a, b in zip(runs[0]["losses"], r["losses"]))
    else:
        runs = [run_job(MAIN, threads=args.threads)]
    if args.compare:
        earlier = json.loads(Path(args.compare).read_text())["runs"][0]
        runs[0]["same_numbers_as_idle"] = runs[0]["losses"] == earlier["losses"] and \
            runs[0]["tokens"] == earlier["tokens"] and runs[0].get("exact_after") == earlier.get("exact_after")
    if args.eval and not args.precision:
        runs.append(run_job(EVAL))
    if args.repeat_busy and not args.precision:
        runs.append(run_job(MAIN, busy=args.repeat_busy))
        runs[-1]["same_numbers_as_idle"] = runs[-1]["losses"] == runs[0]["losses"] and \
            runs[-1]["tokens"] == runs[0]["tokens"] and runs[-1].get("exact_after") == runs[0].get("exact_after")
    rows = []
    for r in runs:
        ev = r.get("eval", [])
        precision = re.search(r"mixed_precision=(\w+)", r["args"])
        rows.append(
            {
                "command": ("eval" if "--eval-data" in r["args"] else "main")
                + (f" mixed_precision={precision.group(1)}" if precision else ""),
                "busy": r["busy_processes"],
                "threads": r["threads"] or torch.get_num_threads(),
                "exact": f"{r.get('exact_before', 0):.0%} -> {r.get('exact_after', 0):.0%}"
                if "exact_after" in r
                else "-",
                "format": f"{r.get('format_before', 0):.0%} -> {r.get('format_after', 0):.0%}"
                if "format_after" in r
                else "-",
                "eval_json": f"{ev[0]['score']:.0%} -> {ev[-1]['score']:.0%}" if ev else "-",
                "perplexity": f"{ev[0]['perplexity']:.1f} -> {ev[-1]['perplexity']:.1f}" if ev else "-",
                "step_s": r["median_step_s"],
                "total_s": r["seconds"],
                "peak_mib": r["peak_memory_mib"],
                "final_loss": r["losses"][-1] if r["losses"] else "-",
                "skipped": r["skipped_steps"],
                "same_as_idle": r.get("same_numbers_as_idle", "-"),
            }
        )
    env = environment(torch.device("cpu"))
    command = "python benchmarks/main_job.py " + " ".join(a for a in (argv or sys.argv[1:]))
    table = (f"# The README's main job (`sdft train {' '.join(MAIN)}`)\n\nCommit {_commit()}; {env}. "
             f"Command: `{command}`\n\n" + markdown_table(rows, list(rows[0])) +
             "\nexact / format: the bundled skill's 36 held-out requests (greedy), before -> after 30 steps. "
             "eval_json / perplexity: the --eval-data variant's table. step_s: median seconds a step.\n")
    for r in runs:
        table += f"\n{r['args']} (busy {r['busy_processes']}): losses {r['losses']}\n  tokens {r['tokens']}\n"
    write_results(ROOT / "benchmarks" / "results", args.stem, {"environment": env, "commit": _commit(), "runs": runs},
                  table)


if __name__ == "__main__":
    main()
