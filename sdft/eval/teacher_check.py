"""Is there anything to distil? The teacher's own answers on the user's data, per teacher template.

SDFT moves the student toward the same model with the demonstration in its context. When that
teacher, shown the demonstration, still does not write the demonstrated answer, SDFT has nothing
to distil: in the forgetting benchmark the paper's template gave a 135M model's teacher 0% and SDFT
with it learned 0% in every run (README). ``teacher_check`` scores, on the first rows of a dataset,
greedy answers from the prompt alone (the student today) and from each template's teacher context,
with an evaluation scorer (``sdft.eval.scorers``): a minute before a run that may take hours.
"""
from __future__ import annotations

from sdft.data.examples import load_examples
from sdft.data.templates import TEMPLATES, check_template, teacher_messages
from sdft.eval.evaluation import generate_answers, shorten
from sdft.eval.scorers import get_scorer

STUDENT = "student (prompt only)"


def teacher_contexts(examples, template: str) -> list:
    """The examples with each prompt replaced by its teacher context; the demonstration stays the target."""
    return load_examples([{"prompt": teacher_messages(ex.messages(), ex.demonstration, template),
                           "demonstration": ex.demonstration} for ex in examples])


def check_inputs(templates, scorer, limit: int, max_new_tokens: int):
    """(scorer function, templates) if every setting is usable; otherwise a one-line ``ValueError``.
    Needs no model, so the CLI calls it before loading one."""
    if limit < 1 or max_new_tokens < 1:
        raise ValueError("limit and max_new_tokens must be >= 1")
    return get_scorer(scorer), [check_template(t) for t in templates]


def teacher_check(model, tokenizer, dataset, templates=TEMPLATES, scorer="normalized", limit: int = 16,
                  max_new_tokens: int = 64) -> list[dict]:
    """One row per context (the student's prompt, then each template's teacher context): its mean
    score against the demonstrations over the first ``limit`` rows, and its first answer."""
    score, templates = check_inputs(templates, scorer, limit, max_new_tokens)
    examples = load_examples(dataset)[:limit]
    rows = []
    for name, contexts in [(STUDENT, examples)] + [(t, teacher_contexts(examples, t)) for t in templates]:
        answers = generate_answers(model, tokenizer, contexts, max_new_tokens)
        scores = [float(score(a, ex.demonstration)) for a, ex in zip(answers, examples)]
        rows.append({"context": name, "score": sum(scores) / len(scores), "examples": len(scores),
                     "first_answer": answers[0]})
    return rows


def verdict(rows: list[dict]) -> str:
    """What the scores mean for a run: which template to use, or that none has anything to distil."""
    student, teachers = rows[0], rows[1:]
    best = max(teachers, key=lambda r: r["score"])
    if best["score"] <= student["score"]:
        return (f"no template's teacher beats the prompt alone ({student['score']:.0%}): SDFT has little to distil "
                "here; try another template, a larger model, or SFT")
    useless = [r["context"] for r in teachers if r["score"] <= student["score"]]
    note = f"; no edge over the prompt alone with {', '.join(useless)}" if useless else ""
    return f"use teacher_template={best['context']!r} ({best['score']:.0%} against {student['score']:.0%}){note}"


def format_rows(rows: list[dict], width: int = 60) -> str:
    """A small text table: each context's score and the start of its first answer."""
    name_width = max(len(r["context"]) for r in rows)
    lines = [f"{'context':<{name_width}}  {'score':>6}  first answer"]
    lines += [f"{r['context']:<{name_width}}  {r['score']:>6.1%}  {shorten(r['first_answer'], width)}" for r in rows]
    return "\n".join(lines)
