"""One SDFT step's loss + backward: sdft (fused head, shared prefixes) vs a naive reference.

    python benchmarks/bench_step.py          # embedded SmolLM2-135M-Instruct, bundled skill prompts

The naive reference is what TRL's SDFTTrainer does in full_logits mode: every rollout runs its whole
prompt (student) and teacher context (teacher) again, both [tokens x vocab] logits are materialized
and TRL's full-logit loss is applied. Rollouts are fixed random completions of a set length, so every
implementation scores the same tokens; sampling costs the same for all and is left out. Writes
benchmarks/results/step_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import (  # noqa: E402
    environment, markdown_table, median_ms, peak_extra_mib, run_in_subprocess, write_results)
from sdft import SDFTConfig, load_model  # noqa: E402
from sdft.group_loss import group_loss  # noqa: E402
from sdft.rollouts import Rollouts  # noqa: E402
from sdft.skill import load_skill  # noqa: E402
from sdft.teacher import Teacher  # noqa: E402
from sdft.trainer import encode_examples  # noqa: E402
from sdft.data import load_examples  # noqa: E402
from sdft_kernels.prefix_sharing import tokens_processed  # noqa: E402

IMPLS = ("sdft", "sdft_unshared", "naive_full_logits")


def naive_group_loss(model, rollouts: Rollouts, teacher_ids: torch.Tensor) -> torch.Tensor:
    """TRL full_logits style: G full sequences per side, full logits, log_softmax, reverse KL (summed)."""
    from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

    def logits(context, grad):
        g, length = rollouts.completions.shape
        ids = torch.cat([context.expand(g, -1), rollouts.completions], dim=1)
        with torch.set_grad_enabled(grad):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return out[:, context.numel() - 1: -1]

    teacher = logits(teacher_ids, grad=False)
    student = logits(rollouts.prompt_ids, grad=True)
    per_token = compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=1.0)
    return (per_token * rollouts.mask).sum()


def _groups(model, tokenizer, prompts, generations, length, device):
    config = SDFTConfig(max_completion_length=length)
    encoded = encode_examples(load_examples(load_skill("train")[:prompts]), tokenizer, config, device)
    gen = torch.Generator().manual_seed(0)
    groups = []
    for ex in encoded:
        completions = torch.randint(0, model.config.vocab_size, (generations, length), generator=gen).to(device)
        groups.append((ex, Rollouts(ex.prompt_ids, completions, torch.ones_like(completions, dtype=torch.bool))))
    return groups


def measure_case(name, prompts, generations, length, reps, device):
    """Summed loss, median ms and peak extra MiB of one step's loss + backward over all prompt groups."""
    device = torch.device(device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(dtype=dtype)
    model.to(device).train()
    groups = _groups(model, tokenizer, prompts, generations, length, device)
    config = SDFTConfig(share_prefix=name == "sdft")
    teacher = Teacher(model, "live")

    def step():
        model.zero_grad(set_to_none=True)
        total = 0.0
        for ex, rollouts in groups:
            if name == "naive_full_logits":
                loss = naive_group_loss(model, rollouts, ex.teacher_ids)
            else:
                loss = group_loss(model, teacher, rollouts, ex.teacher_ids, config)
            loss.backward()
            total += float(loss.detach())
        return total

    mem = peak_extra_mib(step, device)
    loss = step()
    ms = median_ms(step, device, warmup=0, reps=reps)
    passes = [tokens_processed(ctx.numel(), length, generations)
              for ex, _ in groups for ctx in (ex.prompt_ids, ex.teacher_ids)]
    shared = name == "sdft"
    return {"loss": loss, "ms": ms, "peak_extra_mib": mem,
            "token_passes": sum(p[0] if shared else p[1] for p in passes)}


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8 if cuda else 2)
    p.add_argument("--generations", type=int, nargs="+", default=[8] if cuda else [4, 8])
    p.add_argument("--length", type=int, default=256 if cuda else 64, help="completion tokens per rollout")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--reps", type=int, default=5 if cuda else 3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    device = "cuda" if cuda else "cpu"
    env = environment(torch.device(device))
    rows = []
    for g in args.generations:
        base = None
        for name in args.impls:
            row = {"prompts": args.prompts, "G": g, "L": args.length, "impl": name}
            row.update(run_in_subprocess("benchmarks.bench_step", "measure_case", name, args.prompts, g,
                                         args.length, args.reps, device))
            if name == "naive_full_logits":
                base = row
            rows.append(row)
            print(row, flush=True)
        for row in rows:
            if base and row["G"] == g:
                row["speedup_vs_naive"] = base["ms"] / row["ms"]
                if row["peak_extra_mib"] and base["peak_extra_mib"]:
                    row["mem_vs_naive_pct"] = 100 * row["peak_extra_mib"] / base["peak_extra_mib"]
    tag = "gpu_" + env["device"].split()[-1].lower() if cuda else "cpu"
    header = (f"# One SDFT step: loss + backward, SmolLM2-135M-Instruct\n\nEnvironment: {env}. "
              f"{args.prompts} prompts x G rollouts x L completion tokens, reverse KL; time is the median of "
              f"{args.reps} steps; peak extra memory is above the loaded model (CUDA allocator; CPU resident "
              "set, one process per case). token_passes counts decoder token positions run (student + "
              "teacher).\n\n")
    columns = ["prompts", "G", "L", "impl", "ms", "speedup_vs_naive", "peak_extra_mib", "mem_vs_naive_pct",
               "token_passes", "loss"]
    write_results(args.out, f"step_{tag}", {"environment": env, "rows": rows}, header + markdown_table(rows, columns))


if __name__ == "__main__":
    main()
