"""Prior capability: what the model could do before learning a new skill, measured before and after.

``general_accuracy``: greedy answers to the probe's questions (103 items of several kinds that
SmolLM2-135M-Instruct answers right before training), right when the answer holds an expected word.
``heldout_perplexity``: perplexity of fixed plain-text paragraphs no run trains on.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sdft.data.examples import load_examples
from sdft.eval.evaluation import generate_answers
from sdft.models import eval_mode

PROBE_FILE = Path(__file__).parent / "data" / "prior_probe.jsonl"

HELDOUT_TEXT = [
    "The river flows slowly through the valley, past old stone bridges and fields of wheat. In spring the "
    "water rises with melted snow from the mountains, and farmers watch the banks with care.",
    "A library is a quiet place where people come to read, study and borrow books. Many libraries now also "
    "lend films, music and computers, and some run classes for children and adults.",
    "Bread is made from flour, water, salt and yeast. The dough is kneaded, left to rise, shaped into loaves "
    "and baked in a hot oven until the crust turns golden brown.",
    "The human heart beats about one hundred thousand times a day. It pumps blood through a network of "
    "arteries and veins that carries oxygen to every part of the body.",
    "Trains connect many cities across Europe. Travellers can often cross several countries in a single day, "
    "watching forests, lakes and small towns pass by the window.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "sugar and oxygen. It takes place mostly in the leaves.",
    "The museum opened a new exhibition about ancient Egypt. Visitors can see painted coffins, jewellery, "
    "tools and papyrus scrolls that are more than three thousand years old.",
    "Good sleep helps the body recover and the mind stay sharp. Doctors suggest going to bed at the same "
    "time each night and keeping screens out of the bedroom.",
]


def probe() -> list[tuple[str, list[str]]]:
    """The probe's (question, expected answers): ``data/prior_probe.jsonl``, made by
    ``make_prior_probe.py`` (items of several kinds the base model answers right)."""
    if not PROBE_FILE.is_file():
        raise FileNotFoundError(f"{PROBE_FILE} is missing: run python benchmarks/make_prior_probe.py")
    rows = [json.loads(line) for line in PROBE_FILE.read_text().splitlines() if line.strip()]
    return [(r["question"], r["answers"]) for r in rows]


def general_accuracy(model, tokenizer, max_new_tokens: int = 40) -> dict:
    """Share of probe questions whose greedy answer names an expected answer (a whole word), plus the answers."""
    from benchmarks.make_prior_probe import is_right

    items = probe()
    examples = load_examples([{"prompt": q, "demonstration": "-"} for q, _ in items])
    answers = generate_answers(model, tokenizer, examples, max_new_tokens)
    right = [is_right(a, words) for a, (_, words) in zip(answers, items)]
    return {"accuracy": sum(right) / len(right), "answers": answers, "items": len(items)}


@torch.no_grad()
def heldout_perplexity(model, tokenizer) -> float:
    """exp(mean token negative log-likelihood) over the held-out paragraphs (plain text, no chat)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with eval_mode(model):
        for text in HELDOUT_TEXT:
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count)
