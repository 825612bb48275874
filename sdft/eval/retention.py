"""Retention: what a run must not lose while it learns the new skill, scored with every evaluation.

SDFT's point is to learn without forgetting, so every evaluation (before training, every
``eval_steps``, at the end) can also score ``retention_data`` (prompt / demonstration rows of what
the model must keep answering, with ``retention_scorer``) and the perplexity of ``retention_text``
(plain paragraphs, blank-line separated, whose perplexity must not rise). ``auto``: for the embedded
SmolLM2 the bundled general probe (103 questions it answers right before training, scored with
``contains``) and held-out paragraphs, when the run evaluates (``eval_data``); a user's own model
gets no bundled probe, and the run says what to pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sdft.data.examples import Example, load_examples
from sdft.data.sources import HELD_OUT_SPLIT
from sdft.eval.evaluation import generate_answers
from sdft.eval.scorers import Scorer, get_scorer
from sdft.models import eval_mode
from sdft.models.positions import check_room, position_limit

DATA_DIR = Path(__file__).parents[1] / "data"
GENERAL_PROBE = DATA_DIR / "general_probe.jsonl"
HELDOUT_TEXT = DATA_DIR / "heldout_text.txt"
ANSWER_TOKENS = 40  # the probe's answers are a few words; 40 tokens as the forgetting benchmark used


@dataclass(frozen=True)
class Retention:
    examples: list[Example] | None  # rows the model must keep answering
    scorer: Scorer
    texts: list[str] | None  # paragraphs whose perplexity must not rise


def read_texts(path) -> list[str]:
    """Paragraphs of a plain-text file (separated by blank lines); a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"retention_text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"retention_text {path}: not UTF-8 text (byte {err.start})") from None
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"retention_text {path} holds no text")
    return paragraphs


def resolve(data: str, text: str, scorer: str, embedded: bool, evaluating: bool, report=print) -> Retention | None:
    """The retention check a run makes (None: none); files are read and checked here, before the model
    loads. ``auto`` means the bundled probe and text for the embedded model when the run evaluates."""
    bundled = embedded and evaluating
    if (data == "auto" or text == "auto") and evaluating and not embedded:
        report("sdft: no retention check for this model (the bundled general probe is the embedded SmolLM2's): "
               "pass retention_data=FILE (rows it must keep answering) and/or retention_text=FILE to see what "
               "the run keeps")
    auto = bundled and "auto" in (data, text)
    data = str(GENERAL_PROBE) if data == "auto" and bundled else "" if data == "auto" else data
    text = str(HELDOUT_TEXT) if text == "auto" and bundled else "" if text == "auto" else text
    if not data and not text:
        return None
    kept = Retention(load_examples(data, split=HELD_OUT_SPLIT) if data else None, get_scorer(scorer),
                     read_texts(text) if text else None)
    if auto:  # on by default: say what it costs each evaluation, and how to turn it off
        on = [(f"{len(kept.examples)} general prompts answered greedily: retention_score", "retention_data=''")
              ] if kept.examples else []
        on += [(f"the perplexity of {len(kept.texts)} paragraphs: retention_text_perplexity", "retention_text=''")
               ] if kept.texts else []
        report(f"sdft: each evaluation also checks what the embedded model keeps ({'; '.join(p for p, _ in on)}); "
               f"{' and '.join(off for _, off in on)} turn{'s' if len(on) == 1 else ''} it off")
    return kept


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(mean token negative log-likelihood) over plain-text paragraphs (no chat template)."""
    device = next(model.parameters()).device
    nll, count, limit = 0.0, 0, position_limit(model)
    with eval_mode(model):
        for k, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            check_room(ids.shape[1], limit, f"retention_text paragraph {k + 1}", "its tokens",
                       "split it into shorter paragraphs (blank-line separated)")
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))


def score(model, tokenizer, retention: Retention, progress=None) -> dict:
    """{"retention_score", "retention_answers"} for the rows, {"retention_text_perplexity"} for the text;
    ``progress(n)``: called as answers are made."""
    out = {}
    if retention.examples:
        answers = generate_answers(model, tokenizer, retention.examples, ANSWER_TOKENS, progress=progress)
        scores = [float(retention.scorer(a, ex.demonstration)) for a, ex in zip(answers, retention.examples)]
        out["retention_score"] = sum(scores) / len(scores)
        out["retention_answers"] = answers
    if retention.texts:
        out["retention_text_perplexity"] = text_perplexity(model, tokenizer, retention.texts)
    return out


def summary(records: list[dict]) -> str | None:
    """One line: the retention figures before -> after (None when the records hold none)."""
    first, last = (records[0], records[-1]) if records else ({}, {})
    parts = []
    if "retention_score" in first:
        parts.append(f"retention data {first['retention_score']:.0%} -> {last['retention_score']:.0%}")
    if "retention_text_perplexity" in first:
        parts.append(f"held-out text perplexity {first['retention_text_perplexity']:.2f} -> "
                     f"{last['retention_text_perplexity']:.2f}")
    return ("kept: " + ", ".join(parts)) if parts else None
