"""The prefix tree's attention: the dense [T, T] mask vs the FlexAttention block mask (``sdft.prefix.attention``).

Two settings, each way in its own process:

* ``8x8``: bench_prefix_memory's micro-batch (8 prompts under one ~530-token system message, G=8
  rollouts of 12-24 tokens, the embedded SmolLM2-135M-Instruct in fp32), the teacher's scoring pass
  (forward without gradient, the fused loss's forward on top). FlexAttention has no backward on CPU
  (torch 2.13), so the student's pass (forward + backward) runs only with the dense mask here; its row
  is the reference "tree path today".
* ``large``: a packed row the dense mask cannot hold in this machine's 24 GiB (P prompts x G rollouts
  of ``--completion`` tokens under a ``--system``-token system message, one tree), the decoder
  truncated to ``--layers`` layers of the same shape with random weights (the mask, not the model, is
  what is measured); the dense mask's bytes are computed, not allocated.

Reports peak memory above the loaded model (resident set), the first call's ms (FlexAttention
compiles then) and the median ms of ``--reps`` more calls.

    python benchmarks/bench_tree_attention.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import environment, markdown_table, median_ms, peak_extra_mib, run_in_subprocess, write_results  # noqa: E402


def _timed(step, reps: int) -> dict:
    t0 = time.perf_counter()
    first_peak = peak_extra_mib(step, torch.device("cpu"))
    first = (time.perf_counter() - t0) * 1e3
    peak = peak_extra_mib(step, torch.device("cpu"))
    return {"first_ms": first, "first_peak_extra_mib": first_peak, "peak_extra_mib": peak,
            "ms": median_ms(step, torch.device("cpu"), warmup=0, reps=reps)}


def run_8x8(attention: str, grad: bool, prompts: int, group: int, reps: int) -> dict:
    from benchmarks.bench_prefix_memory import scoring_step

    step, passes = scoring_step("tree", prompts, group, grad=grad, attention=attention)
    return {**_timed(step, reps), "token_passes": sum(passes)}


def large_tree(prompts: int, group: int, system: int, completion: int):
    """(contexts, completions, mask) of one wide tree: P prompts of 50 tokens under one system message."""
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(100, 40000, (system,), generator=gen)
    contexts = [torch.cat([head, torch.randint(100, 40000, (50,), generator=gen)]) for _ in range(prompts)]
    completions = torch.randint(100, 40000, (prompts * group, completion), generator=gen)
    return contexts, completions, torch.ones_like(completions, dtype=torch.bool)


def run_large(prompts: int, group: int, system: int, completion: int, layers: int, reps: int) -> dict:
    from transformers import AutoConfig, AutoModel

    from benchmarks.bench_trl import model_dir
    from sdft.prefix.packed import tree_hidden

    config = AutoConfig.from_pretrained(model_dir())
    config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    decoder = AutoModel.from_config(config).eval()
    batch = large_tree(prompts, group, system, completion)

    def step():
        with torch.no_grad():
            tree_hidden(decoder, *batch, 0, None, "flex")

    return _timed(step, reps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--large", type=int, nargs=4, default=[16, 8, 2000, 1250], metavar=("P", "G", "SYSTEM", "COMPL"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default="tree_attention_cpu")
    args = p.parse_args(argv)
    rows = []
    for attention, grad in (("dense", True), ("dense", False), ("flex", False)):
        out = run_in_subprocess("benchmarks.bench_tree_attention", "run_8x8", attention, grad, args.prompts,
                                args.group, args.reps)
        row = {"setting": f"{args.prompts}x{args.group}", "pass": "student fwd+bwd" if grad else "teacher fwd",
               "attention": attention, **out}
        print(row, flush=True)
        rows.append(row)
    if not args.skip_large:
        P, G, system, completion = args.large
        nodes = system + P * 50 + P * G * completion
        row = {"setting": f"large {P}x{G}, {nodes} nodes, {args.layers} layers", "pass": "teacher fwd",
               "attention": "dense", "dense_mask_gib": nodes * nodes / 2**30}
        rows.append(row)
        try:
            out = run_in_subprocess("benchmarks.bench_tree_attention", "run_large", P, G, system, completion,
                                    args.layers, 1)
        except RuntimeError as err:
            print(str(err)[-800:], file=sys.stderr)
            out = {"failed": True}
        row = {**row, "attention": "flex", "dense_mask_gib": None, **out}
        print(row, flush=True)
        rows.append(row)
    env = environment(torch.device("cpu"))
    header = (f"# Prefix-tree attention: dense mask vs FlexAttention block mask\n\nEnvironment: {env}. "
              f"See the docstring of benchmarks/bench_tree_attention.py for the settings. Peak resident memory "
              f"above the loaded model (first call, then a later one), ms of the first call (compile included) "
              f"and the median of {args.reps} more (the large row: 1 more).\n\n"
              f"Command: `python benchmarks/bench_tree_attention.py {' '.join(argv or sys.argv[1:])}`\n\n")
    cols = ["setting", "pass", "attention", "first_ms", "ms", "first_peak_extra_mib", "peak_extra_mib",
            "token_passes", "dense_mask_gib"]
    write_results(args.out, args.stem, {"environment": env, "rows": rows}, header + markdown_table(rows, cols))


if __name__ == "__main__":
    main()
