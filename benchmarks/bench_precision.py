"""Our whole SDFT step at each ``mixed_precision`` on this machine (``bench_trl.run_sdft``: the short
tool-call prompts, G=4, 2 prompts a step, 24 completion tokens, forward KL, frozen teacher), each in a
fresh process, one after the other.

On a CPU whether 16-bit pays depends on its instructions (AVX512-BF16 / AMX multiply bf16 in hardware,
AVX2 emulates it); the environment line records them. ``dtype_bf16``: no autocast, the weights
loaded in bfloat16 (``dtype=bfloat16``, for models that do not fit in fp32).

    python benchmarks/bench_precision.py --stem precision_cpu_avx2
    python benchmarks/bench_precision.py --precisions no dtype_bf16 --stem precision_dtype_cpu_avx2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_trl import COMPLETION, model_dir  # noqa: E402
from benchmarks.measure import environment, markdown_table, run_in_subprocess, write_results  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", nargs="+", default=["no", "bf16", "fp16"],
                   choices=["no", "bf16", "fp16", "dtype_bf16"])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not counted)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default="precision_cpu")
    args = p.parse_args(argv)
    model_dir()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs, table = {}, []
    for precision in args.precisions:
        mixed, dtype = ("no", "bfloat16") if precision == "dtype_bf16" else (precision, "float32")
        runs[precision] = run_in_subprocess("benchmarks.bench_trl", "run_sdft", "short", 4, 2, args.steps, "sdft",
                                            "frozen", mixed, dtype)
        print(precision, json.dumps(runs[precision]), flush=True)
    base = runs.get("no")
    for precision, r in runs.items():
        name = "no, dtype=bfloat16" if precision == "dtype_bf16" else precision
        table.append({"mixed_precision": name, "s_per_step": r["seconds_per_step"],
                      "vs_fp32": r["seconds_per_step"] / base["seconds_per_step"] if base else None,
                      "peak_mib": r["peak_memory_mib"], "loss": r["loss"]})
    env = environment(device)
    header = (f"# Our SDFT step by mixed_precision\n\nEnvironment: {env}. Short prompts, G=4, 2 prompts a step, at "
              f"most {COMPLETION} completion tokens, forward KL, frozen teacher; median seconds per optimizer step "
              f"over steps 2..{args.steps}; peak memory of the run's process.\n\n"
              f"Command: `python benchmarks/bench_precision.py {' '.join(argv or sys.argv[1:])}`\n\n")
    write_results(args.out, args.stem, {"environment": env, "runs": runs},
                  header + markdown_table(table, list(table[0])))


if __name__ == "__main__":
    main()
