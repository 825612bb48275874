"""The bundled new skill: turn a request into a one-line JSON tool call.

``python -m sdft.data.skill`` regenerates ``sdft/data/tool_calls_{train,eval}.jsonl`` (deterministic).
The prompts carry no instruction about the format, so the model must learn it from demonstrations;
eval requests use argument values never seen in training.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent  # the bundled files lie beside this module

TOOLS = {
    "set_timer": ("minutes", ["Set a timer for {} minutes.", "Start a {} minute timer.",
                              "Can you time {} minutes for me?"]),
    "get_weather": ("city", ["What's the weather like in {}?", "Is it raining in {}?",
                             "Tell me the forecast for {}."]),
    "play_music": ("genre", ["Play some {} music.", "I want to listen to {}.", "Put on a {} playlist."]),
    "call_contact": ("name", ["Call {}.", "Phone {} for me.", "Ring {} please."]),
}
VALUES = {
    "minutes": [str(n) for n in (3, 5, 7, 10, 12, 15, 20, 25, 30, 45, 8, 40, 6, 18)],
    "city": ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Berlin", "Denver", "Madrid", "Seoul", "Rome",
             "Boston", "Dublin"],
    "genre": ["jazz", "rock", "classical", "reggae", "techno", "blues", "folk", "metal", "salsa", "country"],
    "name": ["Alice", "Bob", "Maria", "Ken", "Priya", "Omar", "Lena", "Tom", "Sofia", "Yuki"],
}
EVAL_SHARE = 3  # the last 3 values of each argument are held out for evaluation


def tool_call(tool: str, value: str) -> str:
    arg = TOOLS[tool][0]
    return json.dumps({"tool": tool, arg: int(value) if arg == "minutes" else value})


def build_split(split: str) -> list[dict]:
    rows = []
    for tool, (arg, phrasings) in TOOLS.items():
        values = VALUES[arg][:-EVAL_SHARE] if split == "train" else VALUES[arg][-EVAL_SHARE:]
        for value in values:
            for phrase in phrasings:
                rows.append({"prompt": phrase.format(value), "demonstration": tool_call(tool, value)})
    random.Random(0 if split == "train" else 1).shuffle(rows)
    return rows


def load_skill(split: str = "train") -> list[dict]:
    path = DATA_DIR / f"tool_calls_{split}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return build_split(split)


def json_score(response: str, demonstration: str, well_formed) -> dict:
    """``format``: the response parses as JSON and ``well_formed(parsed)``; ``exact``: it equals the
    demonstration's JSON as well."""
    try:
        parsed = json.loads(response.strip())
    except json.JSONDecodeError:
        return {"format": 0.0, "exact": 0.0}
    ok = bool(well_formed(parsed))
    return {"format": float(ok), "exact": float(ok and parsed == json.loads(demonstration))}


def score(response: str, demonstration: str) -> dict:
    """``format``: the response is a JSON object with a "tool" key; ``exact``: it equals the demonstration."""
    return json_score(response, demonstration, lambda parsed: isinstance(parsed, dict) and "tool" in parsed)


def main():
    DATA_DIR.mkdir(exist_ok=True)
    for split in ("train", "eval"):
        rows = build_split(split)
        (DATA_DIR / f"tool_calls_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{split}: {len(rows)} examples")


if __name__ == "__main__":
    main()
