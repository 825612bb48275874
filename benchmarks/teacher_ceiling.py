"""What SDFT can distil at most: the teacher's own greedy answers, per skill and teacher template.

    python benchmarks/teacher_ceiling.py                 # every skill, both templates
    python benchmarks/teacher_ceiling.py --eval-limit 12

SDFT moves the student toward the teacher, which is the same model with the demonstration in its
context. When that teacher cannot write the demonstrated answer itself, there is little to distil.
This scores, on each skill's held-out prompts (the forgetting benchmark's skills and scorers), the
base model's greedy answers from the student prompt and from the teacher context of each template
(``fewshot``: the demonstration as an earlier turn on the same question; ``paper``: the paper's
wording), against the demonstrations. Writes ``benchmarks/results/teacher_ceiling.{json,md}``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.forgetting_skills import all_skills  # noqa: E402
from benchmarks.measure import environment, markdown_table, write_results  # noqa: E402
from sdft import load_model  # noqa: E402
from sdft.data.examples import load_examples  # noqa: E402
from sdft.data.templates import TEMPLATES  # noqa: E402
from sdft.eval.evaluation import generate_answers  # noqa: E402
from sdft.eval.teacher_check import teacher_contexts  # noqa: E402


def exact_share(model, tokenizer, rows: list[dict], score, max_new_tokens: int) -> tuple[float, list[str]]:
    examples = load_examples(rows)
    answers = generate_answers(model, tokenizer, examples, max_new_tokens)
    return sum(score(a, ex.demonstration)["exact"] for a, ex in zip(answers, examples)) / len(examples), answers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-limit", type=int, default=24, help="held-out prompts per skill (as bench_forgetting)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default="teacher_ceiling")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    env = environment(torch.device("cpu"))
    model, tokenizer = load_model()
    results, table = [], []
    for skill in all_skills():
        rows = skill.eval[:args.eval_limit]
        examples = load_examples(rows)
        line = {"skill": skill.name, "prompts": len(rows)}
        student, _ = exact_share(model, tokenizer, rows, skill.score, args.max_new_tokens)
        line["student_prompt"] = student
        samples = {}
        for template in TEMPLATES:
            contexts = teacher_contexts(examples, template)
            share, answers = exact_share(model, tokenizer, contexts, skill.score, args.max_new_tokens)
            line[f"teacher_{template}"] = share
            samples[template] = answers[:3]
        print(line, flush=True)
        table.append(line)
        results.append({**line, "demonstrations": [r["demonstration"] for r in rows[:3]], "teacher_samples": samples})
    header = ("# Teacher ceiling: the base model's greedy answers with the demonstration in context\n\n"
              f"Environment: {env}. SmolLM2-135M-Instruct, greedy, at most "
              f"{args.max_new_tokens} new tokens, exact match with the demonstration on each skill's first "
              f"{args.eval_limit} held-out prompts (the forgetting benchmark's scorers). `student_prompt`: the "
              "prompt alone; `teacher_<template>`: the teacher context SDFT builds with that template.\n\n"
              f"Command: `python benchmarks/teacher_ceiling.py {' '.join(argv or sys.argv[1:])}`\n\n")
    write_results(args.out, args.stem, {"environment": env, "rows": results},
                  header + markdown_table(table, list(table[0])))


if __name__ == "__main__":
    main()
