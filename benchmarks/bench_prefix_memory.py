"""Scoring one micro-batch three ways: the prefix tree vs expand-and-copy vs every row in full.

The student side of one SDFT micro-batch (P prompts under one ~530-token system message, G rollouts
of 24 tokens each, the embedded SmolLM2-135M-Instruct in fp32), forward and backward of the fused
forward-KL loss against fixed teacher hidden states, each way in its own process:

* ``tree``: ``sdft.prefix.packed.tree_hidden``, one packed pass over the micro-batch's prefix tree
  (every distinct prefix once, a tree-shaped attention mask; nothing copied per rollout);
* ``expand_copy``: ``batched_prefix_hidden``, each prompt's prefix once, its KV cache then copied G
  times (``batch_repeat_interleave``) for the continuations: what HF-style prefix sharing does;
* ``unshared``: ``batched_unshared_hidden``, every rollout runs its whole prompt again (TRL's way).

Reports the peak memory above the loaded model (resident set on the CPU, allocator on CUDA), the
milliseconds of forward + backward (median of ``--reps``) and the token passes.

    python benchmarks/bench_prefix_memory.py --prompts 8 --group 8
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import environment, markdown_table, median_ms, peak_extra_mib, run_in_subprocess, write_results  # noqa: E402

WAYS = ("tree", "expand_copy", "unshared")
COMPLETION = 24


def _batch(prompts: int, group: int):
    from benchmarks.bench_trl import model_dir, rows
    from sdft import load_model
    from sdft.data.chat import chat_ids
    from sdft.data.examples import load_examples

    model, tok = load_model(model_dir())
    examples = load_examples(rows("shared"))[:prompts]
    contexts = [chat_ids(tok, ex.messages(), torch.device("cpu")) for ex in examples]
    g = torch.Generator().manual_seed(0)
    completions = torch.randint(100, 40000, (prompts * group, COMPLETION), generator=g)
    lengths = torch.randint(COMPLETION // 2, COMPLETION + 1, (prompts * group,), generator=g)
    mask = torch.arange(COMPLETION)[None] < lengths[:, None]
    return model, contexts, completions.masked_fill(~mask, tok.pad_token_id), mask, tok.pad_token_id


def scoring_step(way: str, prompts: int, group: int, checkpointing: bool = False, grad: bool = True,
                 attention: str = "auto", loss: bool = True):
    """(step, passes): one micro-batch's scoring pass the ``way`` given (``attention``: the tree's, see
    ``sdft.prefix.attention``) with the fused loss on top (unless not ``loss``: the decoder's pass alone)
    and, with ``grad``, its backward; ``passes`` holds the token passes of the last call."""
    from sdft.models import decoder_of, enable_checkpointing
    from sdft.prefix import packed as bp
    from sdft_kernels import fused_linear_divergence

    torch.manual_seed(0)
    model, contexts, completions, mask, pad = _batch(prompts, group)
    model.train(grad)
    if checkpointing:
        enable_checkpointing(model)
    fn = {"tree": partial(bp.tree_hidden, attention=attention), "expand_copy": bp.batched_prefix_hidden,
          "unshared": bp.batched_unshared_hidden}[way]
    decoder = decoder_of(model)
    weight = model.lm_head.weight
    teacher = torch.randn(*completions.shape, weight.shape[1], generator=torch.Generator().manual_seed(1))
    passes = []

    def step():
        passes.clear()
        with torch.set_grad_enabled(grad):
            hidden = fn(decoder, contexts, completions, mask, pad, passes)
            if not loss:
                return
            value = fused_linear_divergence(hidden, teacher, weight, mask=mask, divergence="forward_kl",
                                            reduction="sum")
            if grad:
                value.backward()
                model.zero_grad(set_to_none=True)

    return step, passes


def run_way(way: str, prompts: int, group: int, reps: int, checkpointing: bool = True) -> dict:
    """One way in this process: peak extra memory of the first fwd+bwd, then the median time."""
    step, passes = scoring_step(way, prompts, group, checkpointing)
    peak = peak_extra_mib(step, torch.device("cpu"))
    ms = median_ms(step, torch.device("cpu"), warmup=0, reps=reps)
    return {"peak_extra_mib": peak, "ms": ms, "token_passes": sum(passes)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[8])
    p.add_argument("--group", type=int, nargs="+", default=[8])
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--unshared-rows", type=int, default=16, help="run the unshared way only up to this many "
                   "rollouts per micro-batch (4 x 4 already takes 17 GB without checkpointing)")
    p.add_argument("--no-checkpointing", action="store_true", help="keep every activation (default: gradient "
                   "checkpointing, TRL's default)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default="prefix_memory_cpu")
    args = p.parse_args(argv)
    table, results = [], []
    for prompts in args.prompts:
        for group in args.group:
            row = {"prompts": prompts, "G": group}
            for way in args.ways:
                if way == "unshared" and prompts * group > args.unshared_rows:
                    row[f"{way}_peak_extra_mib"] = row[f"{way}_ms"] = row[f"{way}_token_passes"] = None
                    continue
                try:
                    out = run_in_subprocess("benchmarks.bench_prefix_memory", "run_way", way, prompts, group,
                                            args.reps, not args.no_checkpointing)
                except RuntimeError as err:  # out of memory on this machine, most likely
                    print(str(err)[-500:], file=sys.stderr)
                    out = {"peak_extra_mib": None, "ms": None, "token_passes": None, "failed": True}
                print(prompts, group, way, out, flush=True)
                results.append({"prompts": prompts, "G": group, "way": way, **out})
                row[f"{way}_peak_extra_mib"] = out["peak_extra_mib"]
                row[f"{way}_ms"] = out["ms"]
                row[f"{way}_token_passes"] = out["token_passes"]
            for way in args.ways:
                if way != "tree" and "tree" in args.ways and row[f"{way}_peak_extra_mib"]:
                    row[f"tree_memory_vs_{way}"] = row["tree_peak_extra_mib"] / row[f"{way}_peak_extra_mib"]
            table.append(row)
    env = environment(torch.device("cpu"))
    header = (
        f"# Scoring one micro-batch: prefix tree vs expand-and-copy vs unshared\n\nEnvironment: {env}. "
        f"Student side of one micro-batch (prompts under one ~530-token system message, G rollouts of "
        f"12-{COMPLETION} tokens), fused forward KL, forward + backward, "
        f"{'without' if args.no_checkpointing else 'with'} gradient checkpointing; peak resident memory above the "
        f"loaded model during the first pass, median ms of {args.reps} more.\n\n"
        f"Command: `python benchmarks/bench_prefix_memory.py {' '.join(argv or sys.argv[1:])}`\n\n"
    )
    write_results(args.out, args.stem, {"environment": env, "rows": results},
                  header + markdown_table(table, list(table[0])))


if __name__ == "__main__":
    main()
