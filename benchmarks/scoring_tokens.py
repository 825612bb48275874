"""How many tokens the SDFT scoring passes process, student vs teacher, against SFT's (counts, no timing).

    python benchmarks/scoring_tokens.py

Runs ``bench_trl``'s own ``short`` setting (``run_sdft``: same model, data, seed and config) for 3
steps at G = 4 and 8 and records, for the last step, the tokens of the student's pass (forward and
backward) and of the frozen teacher's (forward only), as the passes themselves count them; and the
tokens of one SFT example (prompt + demonstration) averaged over the bundled rows. Counting a
backward as two forwards, the scoring's work relative to an SFT step of the same 2 examples is
``(3 * student + teacher) / (3 * 2 * sft_tokens_per_example)``: what the step ratio cannot go below
before any rollout is generated. Writes benchmarks/results/scoring_tokens_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_trl import model_dir, rows, run_sdft  # noqa: E402
from benchmarks.measure import environment, markdown_table, write_results  # noqa: E402

PROMPTS, STEPS = 2, 3


def sft_tokens_per_example(setting: str) -> float:
    """Mean tokens of prompt + demonstration as one chat, over the setting's rows."""
    from sdft import load_model
    from sdft.data.chat import chat_ids
    from sdft.data.examples import load_examples

    _, tokenizer = load_model(model_dir())
    lengths = [chat_ids(tokenizer, ex.messages() + [{"role": "assistant", "content": ex.demonstration}], "cpu",
                        add_generation_prompt=False).numel() for ex in load_examples(rows(setting))]
    return statistics.mean(lengths)


def scoring_passes(group: int) -> dict:
    """The last step's scoring passes of ``run_sdft("short", group, ...)``, split by whether they take a gradient."""
    import sdft.prefix.packed as bp

    counted, real_count = [], bp._count

    def count(passes, tokens):
        counted.append((torch.is_grad_enabled(), tokens))
        return real_count(passes, tokens)

    bp._count = count
    try:
        summary = run_sdft("short", group, PROMPTS, STEPS)
    finally:
        bp._count = real_count
    last = counted[-2:]  # one student and one teacher pass a step (one micro-batch)
    return {"student_tokens": sum(t for grad, t in last if grad),
            "teacher_tokens": sum(t for grad, t in last if not grad),
            "tokens_processed": summary["tokens_processed"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    sft = sft_tokens_per_example("short")
    table = []
    for group in (4, 8):
        line = {"setting": f"short_g{group}", "G": group, **scoring_passes(group), "sft_tokens_per_example": sft}
        line["scoring_work_over_sft"] = ((3 * line["student_tokens"] + line["teacher_tokens"])
                                         / (3 * PROMPTS * sft))
        table.append(line)
    md = ("# Tokens of the SDFT scoring passes vs an SFT step\n\n"
          f"Environment: {environment(torch.device('cpu'))}. `bench_trl.py`'s `short` setting, {PROMPTS} prompts, "
          f"the last of {STEPS} steps; a backward counted as two forwards.\n\n"
          "Command: `python benchmarks/scoring_tokens.py`\n\n"
          + markdown_table(table, list(table[0])) + "\n")
    write_results(args.out, "scoring_tokens_cpu", {"environment": environment(torch.device("cpu")), "rows": table}, md)


if __name__ == "__main__":
    main()
