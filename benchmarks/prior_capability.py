"""Prior capability: what the model could do before learning a new skill, measured before and after,
through the library's retention check (``sdft.eval.retention``) so the benchmark and every user's run
measure the same thing.

``general_accuracy``: greedy answers to the bundled general probe (``sdft/data/general_probe.jsonl``:
103 items of several kinds that SmolLM2-135M-Instruct answers right before training, made by
``make_prior_probe.py``), right when the answer holds an expected word (the ``contains`` scorer).
``heldout_perplexity``: perplexity of the bundled plain-text paragraphs no run trains on
(``sdft/data/heldout_text.txt``).
"""
from __future__ import annotations

from sdft.data.examples import load_examples
from sdft.eval import retention
from sdft.eval.scorers import get_scorer


def general_accuracy(model, tokenizer) -> dict:
    """Share of probe questions whose greedy answer names an expected answer (a whole word), plus the answers."""
    probe = retention.Retention(load_examples(str(retention.GENERAL_PROBE)), get_scorer("contains"), None)
    found = retention.score(model, tokenizer, probe)
    return {"accuracy": found["retention_score"], "answers": found["retention_answers"], "items": len(probe.examples)}


def heldout_perplexity(model, tokenizer) -> float:
    """exp(mean token negative log-likelihood) over the held-out paragraphs (plain text, no chat)."""
    return retention.text_perplexity(model, tokenizer, retention.read_texts(str(retention.HELDOUT_TEXT)))
