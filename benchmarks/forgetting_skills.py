"""Three new skills for the forgetting benchmark, each a fixed output format learned from demonstrations.

1. ``tool_calls``: a request becomes a one-line JSON tool call (the bundled skill of ``sdft.data.skill``).
2. ``shopping_list``: a sentence naming three items becomes a JSON list of them.
3. ``hashtags``: a three-word topic becomes three lowercase hashtags.

Each skill's prompts open with its own system message naming the setting (a smart-home assistant, a
shopping app, a social-media helper) but not the format, which must be learned from demonstrations;
so a model can learn when to use the format, and general questions (default system prompt) should
keep their usual answers. Eval prompts use words never seen in training.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from typing import Callable

from sdft.data.skill import json_score, load_skill
from sdft.data.skill import score as tool_call_score

ITEMS = ["eggs", "milk", "bread", "apples", "rice", "cheese", "butter", "coffee", "tea", "onions", "carrots",
         "pasta", "sugar", "flour", "bananas", "yogurt", "honey", "beans", "lemons", "salt"]
ITEM_PHRASES = ["I need to buy {}, {} and {}.", "Pick up {}, {} and {} on the way home.",
                "We're out of {}, {} and {}."]
HELD_OUT_ITEMS = 5

TOPIC_WORDS = [["sunny", "quiet", "late", "happy", "cold", "lazy", "busy", "rainy", "golden", "wild"],
               ["beach", "night", "morning", "city", "forest", "kitchen", "garden", "river", "mountain", "office"],
               ["walk", "coffee", "party", "music", "dinner", "reading", "coding", "picnic", "sunset", "run"]]
HELD_OUT_WORDS = 3


SYSTEM = {"tool_calls": "You are the voice assistant of a smart home.",
          "shopping_list": "You are the shopping list app.",
          "hashtags": "You are the social media post helper."}


def _in_setting(name: str, rows: list[dict]) -> list[dict]:
    """Rows with the skill's system message in front of the user prompt (chat-message form)."""
    return [{"prompt": [{"role": "system", "content": SYSTEM[name]}, {"role": "user", "content": r["prompt"]}],
             "demonstration": r["demonstration"]} for r in rows]


@dataclass
class Skill:
    name: str
    train: list[dict]
    eval: list[dict]
    score: Callable[[str, str], dict]


def shopping_score(response: str, demonstration: str) -> dict:
    return json_score(response, demonstration, lambda parsed: isinstance(parsed, list))


def hashtag_score(response: str, demonstration: str) -> dict:
    words = response.split()
    ok = bool(words) and all(w.startswith("#") and len(w) > 1 for w in words)
    return {"format": float(ok), "exact": float(ok and words == demonstration.split())}


def _shopping_rows(items: list[str], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    combos = list(itertools.permutations(items, 3))
    rng.shuffle(combos)
    rows = []
    for k, combo in enumerate(combos[:count]):
        rows.append({"prompt": ITEM_PHRASES[k % len(ITEM_PHRASES)].format(*combo),
                     "demonstration": json.dumps(list(combo))})
    return rows


def _hashtag_rows(pools: list[list[str]], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    combos = list(itertools.product(*pools))
    rng.shuffle(combos)
    return [{"prompt": " ".join(c).capitalize() + ".", "demonstration": " ".join("#" + w for w in c)}
            for c in combos[:count]]


def all_skills() -> list[Skill]:
    """The three skills in the order the sequential run learns them."""
    words_train = [p[:-HELD_OUT_WORDS] for p in TOPIC_WORDS]
    words_eval = [p[-HELD_OUT_WORDS:] for p in TOPIC_WORDS]
    splits = {
        "tool_calls": (load_skill("train"), load_skill("eval"), tool_call_score),
        "shopping_list": (
            _shopping_rows(ITEMS[:-HELD_OUT_ITEMS], 90, 0),
            _shopping_rows(ITEMS[-HELD_OUT_ITEMS:], 30, 1),
            shopping_score,
        ),
        "hashtags": (_hashtag_rows(words_train, 90, 0), _hashtag_rows(words_eval, 27, 1), hashtag_score),
    }
    return [Skill(name, _in_setting(name, tr), _in_setting(name, ev), score)
            for name, (tr, ev, score) in splits.items()]
