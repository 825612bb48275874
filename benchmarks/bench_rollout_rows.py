"""Rollout decoding over prompt rows packed for the prefill alone against rows packed for the decoding too.

Every decoding step, a row's rollouts attend over the whole row under its dense mask: its prompts' nodes and
every rollout's tokens so far. Rows packed for the prefill alone (``prefill``: the cost model before
``sdft.prefix.tree.Decoding``) put prompts that share a chat template's header in one row, whose rollouts
then attend over each other's tokens; ``decoding`` is sdft's rule (``sdft.rollout.engine.pack_prompts``): the
cheapest layout counting the steps that follow and the padding slots. Both sides sample from the same
seed (``same_tokens``: their first 8 tokens agree; the layouts round differently, so a draw can differ):
only the packing differs.

Model: SmolLM2-135M-Instruct (``SDFT_BENCH_MODEL`` or the embedded one, see ``bench_trl.model_dir``); the
bundled tool-call prompts under the model's chat template, fp32 on CPU and bf16 on CUDA, every rollout
``--steps`` tokens (EOS is suppressed for the timing). Each side runs in its own process; the median of
``--reps`` calls after one warm-up call.

    python benchmarks/bench_rollout_rows.py     # results/rollout_rows_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.measure import run_in_subprocess, sync, write_report  # noqa: E402


def run_side(side: str, prompts: int, group: int, steps: int, reps: int) -> dict:
    """Median seconds of one ``HFRolloutEngine.generate`` call, and the rows the prompts took."""
    import torch

    import sdft
    from benchmarks.bench_trl import model_dir
    from sdft.data.skill import load_skill
    from sdft.prefix import tree
    from sdft.rollout import engine

    seen = {}
    pack = engine.pack_prompts

    def recording(prompt_ids, pad_id, pairs, config, group_, steps_, device=None):
        if side == "prefill":  # the rule before: the prefill's cost alone
            packed = tree.pack_groups([(p, []) for p in prompt_ids], pad_id, pairs, device)
        else:
            packed = pack(prompt_ids, pad_id, pairs, config, group_, steps_, device)
        seen.update(rows=len(packed.row_sizes), width=packed.width,
                    cache_positions=engine.cache_positions(packed, group_, steps_))
        return packed

    engine.pack_prompts = recording
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what a run's rollouts compute in there
    model, tokenizer = sdft.load_model(model_dir(), dtype)
    model.to(device)
    rows = load_skill("train")[:prompts]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"][0].to(device)
           for r in rows]
    rollout = engine.HFRolloutEngine(tokenizer)
    stop = engine.eos_ids
    engine.eos_ids = lambda model_, tokenizer_: {-1}  # no token stops a rollout
    seconds = []
    for _ in range(reps + 1):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        batch = rollout.generate(model, ids, group, steps, temperature=1.0)
        sync(device)
        seconds.append(time.perf_counter() - t0)
    engine.eos_ids = stop
    return {"seconds": statistics.median(seconds[1:]), "all_seconds": seconds, "tokens": batch.num_tokens,
            "first_tokens": batch.completions[:, :8].tolist(), "prompt_tokens": sum(i.numel() for i in ids), **seen}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--stem", default="rollout_rows_cpu")
    args = p.parse_args(argv)
    results = []
    for group in args.groups:
        row = {"prompts": args.prompts, "G": group, "steps": args.steps}
        runs = {side: run_in_subprocess("benchmarks.bench_rollout_rows", "run_side", side, args.prompts, group,
                                        args.steps, args.reps) for side in ("prefill", "decoding")}
        row["same_tokens"] = runs["prefill"]["first_tokens"] == runs["decoding"]["first_tokens"]
        for side, out in runs.items():
            row.update({f"{side}_rows": out["rows"], f"{side}_s": out["seconds"],
                        f"{side}_cache_positions": out["cache_positions"]})
        row["speedup"] = runs["prefill"]["seconds"] / runs["decoding"]["seconds"]
        row["tokens_per_s_decoding"] = runs["decoding"]["tokens"] / runs["decoding"]["seconds"]
        print(row, flush=True)
        results.append({**row, "runs": runs})
    table = [{k: v for k, v in r.items() if k != "runs"} for r in results]
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_report(args.out, args.stem, "Rollout rows packed for the prefill alone vs for the decoding too",
                 f"{args.prompts} bundled tool-call prompts under SmolLM2's chat template (its default system "
                 f"message shared), G rollouts of {args.steps} tokens each (no EOS), "
                 f"{'bf16' if device.type == 'cuda' else 'fp32'}, dense mask; median "
                 f"seconds of one generate call over {args.reps} calls after a warm-up, each side in its own process.",
                 f"python benchmarks/bench_rollout_rows.py {' '.join(argv or sys.argv[1:])}".strip(),
                 {"rows": results}, table, device=device)


if __name__ == "__main__":
    main()
