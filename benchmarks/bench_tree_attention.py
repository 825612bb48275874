"""The prefix tree's attention: the dense [T, T] mask vs the FlexAttention block mask (``sdft.prefix.attention``).

Two settings, each way in its own process:

* ``8x8``: bench_prefix_memory's micro-batch (8 prompts under one ~530-token system message, G=8
  rollouts of 12-24 tokens, the embedded SmolLM2-135M-Instruct in fp32), the teacher's scoring pass
  (forward without gradient, the fused loss's forward on top; "tree alone": the decoder's pass without
  it, where the attention's share of the memory shows: the loss's [256, V] logit blocks are the same
  either way). FlexAttention has no backward on CPU
  (torch 2.13), so the student's pass (forward + backward) runs only with the dense mask here; its row
  is the reference "tree path today".
* ``large``: a packed row the dense mask cannot hold in this machine's 24 GiB (P prompts x G rollouts
  of ``--completion`` tokens under a ``--system``-token system message, one tree), the decoder
  truncated to ``--layers`` layers of the same shape with random weights (the mask, not the model, is
  what is measured); the dense mask's bytes are computed, not allocated.

Reports peak memory above the loaded model (resident set; the 8x8 rows: the median of 3 calls after
the first), the first call's ms (FlexAttention compiles then) and the median ms of ``--reps`` more calls.

    python benchmarks/bench_tree_attention.py
    python benchmarks/bench_tree_attention.py --sweep      # by packed width, on CUDA where there is one

``--sweep`` (``run_sweep``) times both masks at growing packed widths on the machine's device: on a GPU,
the measurement behind the ``auto`` rule's threshold (``sdft.prefix.attention.FLEX_MIN_NODES``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import (  # noqa: E402
    environment,
    markdown_table,
    median_ms,
    peak_extra_mib,
    run_in_subprocess,
    sync,
    write_report,
    write_results,
)


def _timed(step, reps: int, device: torch.device = torch.device("cpu"), peaks: int = 1) -> dict:
    """The first call's ms and peak, the median peak of ``peaks`` later calls, the median ms of ``reps`` more."""
    t0 = time.perf_counter()
    first_peak = peak_extra_mib(step, device)
    sync(device)
    first = (time.perf_counter() - t0) * 1e3
    peak = statistics.median(peak_extra_mib(step, device) for _ in range(peaks))
    return {"first_ms": first, "first_peak_extra_mib": first_peak, "peak_extra_mib": peak,
            "ms": median_ms(step, device, warmup=0, reps=reps)}


def run_8x8(attention: str, grad: bool, prompts: int, group: int, reps: int, loss: bool = True) -> dict:
    from benchmarks.bench_prefix_memory import scoring_step

    step, passes = scoring_step("tree", prompts, group, grad=grad, attention=attention, loss=loss)
    return {**_timed(step, reps, peaks=3), "token_passes": sum(passes)}


def large_tree(prompts: int, group: int, system: int, completion: int):
    """(contexts, completions, mask) of one wide tree: P prompts of 50 tokens under one system message."""
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(100, 40000, (system,), generator=gen)
    contexts = [torch.cat([head, torch.randint(100, 40000, (50,), generator=gen)]) for _ in range(prompts)]
    completions = torch.randint(100, 40000, (prompts * group, completion), generator=gen)
    return contexts, completions, torch.ones_like(completions, dtype=torch.bool)


def run_large(prompts: int, group: int, system: int, completion: int, layers: int, reps: int) -> dict:
    from sdft.prefix.packed import tree_hidden

    decoder = random_decoder(layers, torch.device("cpu")).eval()
    batch = large_tree(prompts, group, system, completion)

    def step():
        with torch.no_grad():
            tree_hidden(decoder, *batch, 0, None, "flex")

    return _timed(step, reps)


def random_decoder(layers: int | None, device: torch.device):
    """The embedded model's decoder shape (``layers`` of them, all when None), seeded random weights."""
    from transformers import AutoConfig, AutoModel

    from benchmarks.bench_trl import model_dir

    config = AutoConfig.from_pretrained(model_dir())
    if layers:
        config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModel.from_config(config).to(device)


def run_sweep(completions: list[int], prompts: int, group: int, system: int, layers: int | None, reps: int,
              done=None) -> list:
    """Dense vs block mask at growing packed widths, on this machine's device: the measurement behind
    ``sdft.prefix.attention.FLEX_MIN_NODES``. One tree of ``prompts`` x ``group`` rollouts of each
    length in ``completions`` under a ``system``-token message; the student's pass (forward + backward)
    and the teacher's (forward), bf16 autocast on CUDA. ``max_rel_diff``: the flex hidden states against
    the dense ones (same pass, same weights). ``done(rows)`` is called after each width (to write what
    is measured so far)."""
    from sdft.prefix.packed import tree_hidden

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decoder = random_decoder(layers, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    for completion in completions:
        contexts, comps, mask = large_tree(prompts, group, system, completion)
        contexts, comps, mask = [c.to(device) for c in contexts], comps.to(device), mask.to(device)
        width = system + prompts * 50 + prompts * group * completion  # the tree's nodes
        hidden = {}
        for grad in (True, False):
            for attention in ("dense", "flex"):
                row = {"width": width, "completion": completion, "pass": "student fwd+bwd" if grad else "teacher fwd",
                       "attention": attention}
                if grad and device.type == "cpu" and attention == "flex":
                    rows.append({**row, "note": "no CPU backward"})
                    continue
                decoder.train(grad)

                def step():
                    with torch.set_grad_enabled(grad), autocast:
                        out = tree_hidden(decoder, contexts, comps, mask, 0, None, attention)
                        if grad:
                            out.float().square().mean().backward()
                    return out

                try:
                    t0 = time.perf_counter()
                    if not grad:  # the first call (compile included), its output kept for max_rel_diff
                        with torch.no_grad(), autocast:
                            hidden[attention] = tree_hidden(decoder, contexts, comps, mask, 0, None, attention).float()
                        sync(device)
                    first = (time.perf_counter() - t0) * 1e3
                    row.update(_timed(step, reps, device))
                    if not grad:
                        row["first_ms"] = first
                    decoder.zero_grad(set_to_none=True)
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "out of memory"
                    torch.cuda.empty_cache()
                if not grad and len(hidden) == 2:
                    ref = hidden["dense"]
                    row["max_rel_diff"] = float((hidden["flex"] - ref).abs().max() / ref.abs().max())
                print(row, flush=True)
                rows.append(row)
        del hidden
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if done is not None:
            done(rows)
    return rows


def sweep_main(argv=None):
    """``--sweep``: dense vs block mask by packed width on this machine's device (CUDA: the flex rule)."""
    p = argparse.ArgumentParser(description=run_sweep.__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--completions", type=int, nargs="+", default=[8, 24, 56, 120, 248, 504])
    p.add_argument("--tree", type=int, nargs=3, default=[4, 8, 256], metavar=("P", "G", "SYSTEM"))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 30)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    tag = "gpu_" + env["device"].split()[-1].lower() if device.type == "cuda" else "cpu"
    header = (f"# Prefix-tree attention by packed width: dense mask vs FlexAttention block mask\n\nEnvironment: "
              f"{env}. One tree of {args.tree[0]} prompts x G={args.tree[1]} under a {args.tree[2]}-token system "
              f"message, the embedded model's shape with random weights ({args.layers or 'all'} layers), bf16 "
              f"autocast on CUDA. Peak memory above the model (CUDA allocator; CPU resident set), ms of the first "
              f"call (compile included) and the median of {args.reps} more; max_rel_diff: flex hidden states vs "
              f"dense.\n\nCommand: `python benchmarks/bench_tree_attention.py {' '.join(argv or sys.argv[1:])}`\n\n")
    cols = ["width", "completion", "pass", "attention", "first_ms", "ms", "peak_extra_mib", "max_rel_diff", "note"]

    def write(rows):  # after every width: a run cut short keeps what it measured
        write_results(args.out, args.stem or f"tree_attention_sweep_{tag}", {"environment": env, "rows": rows},
                      header + markdown_table(rows, cols))

    run_sweep(args.completions, *args.tree, args.layers, args.reps, done=write)


def main(argv=None):
    if "--sweep" in (sys.argv[1:] if argv is None else argv):
        return sweep_main(argv)
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
    passes = {(True, True): "student fwd+bwd", (False, True): "teacher fwd", (False, False): "teacher fwd, tree alone"}
    for attention, grad, loss in (("dense", True, True), ("dense", False, True), ("flex", False, True),
                                  ("dense", False, False), ("flex", False, False)):
        out = run_in_subprocess("benchmarks.bench_tree_attention", "run_8x8", attention, grad, args.prompts,
                                args.group, args.reps, loss)
        row = {"setting": f"{args.prompts}x{args.group}", "pass": passes[grad, loss], "attention": attention, **out}
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
    settings = ("See the docstring of benchmarks/bench_tree_attention.py for the settings. Peak resident memory "
                "above the loaded model (first call, then the median of 3 later ones; the large row: one), "
                "freed heap pages returned before each; ms of the first call (compile included) "
                f"and the median of {args.reps} more (the large row: 1 more).")
    cols = ["setting", "pass", "attention", "first_ms", "ms", "first_peak_extra_mib", "peak_extra_mib",
            "token_passes", "dense_mask_gib"]
    write_report(args.out, args.stem, "Prefix-tree attention: dense mask vs FlexAttention block mask", settings,
                 f"python benchmarks/bench_tree_attention.py {' '.join(argv or sys.argv[1:])}", {"rows": rows}, rows,
                 cols)


if __name__ == "__main__":
    main()
