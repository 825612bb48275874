"""Build the prior-capability probe: items of several kinds that the base model answers right.

Candidates are generated deterministically (no randomness, no network): capitals, small
arithmetic, opposites, colours of things, one-word answers, simple facts. Each is asked to the
embedded SmolLM2-135M-Instruct with greedy decoding; those it answers right (the ``contains``
scorer: an expected answer as a whole word) are written to the library's bundled probe,
``sdft/data/general_probe.jsonl`` ({"prompt", "demonstration": the answers joined by " | ", "kind"}),
which every run's retention check and the forgetting benchmark ask. Re-running this script on the
same model rewrites the same file.

    python benchmarks/make_prior_probe.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
OUT = Path(__file__).resolve().parents[1] / "sdft" / "data" / "general_probe.jsonl"

CAPITALS = {"France": "paris", "Japan": "tokyo", "Germany": "berlin", "Italy": "rome", "Spain": "madrid",
            "England": "london", "Russia": "moscow", "China": "beijing", "Egypt": "cairo", "Greece": "athens",
            "Canada": "ottawa", "Australia": "canberra", "Ireland": "dublin", "Portugal": "lisbon",
            "Austria": "vienna", "Norway": "oslo", "Sweden": "stockholm", "Poland": "warsaw",
            "Kenya": "nairobi", "Mexico": "mexico city", "Argentina": "buenos aires", "Peru": "lima",
            "Thailand": "bangkok", "South Korea": "seoul", "India": "new delhi", "Turkey": "ankara",
            "Finland": "helsinki", "Denmark": "copenhagen", "Belgium": "brussels", "Cuba": "havana",
            "the Netherlands": "amsterdam", "Switzerland": "bern", "Hungary": "budapest", "Iran": "tehran",
            "Iraq": "baghdad", "Chile": "santiago", "Colombia": "bogota", "Vietnam": "hanoi",
            "Indonesia": "jakarta", "the Philippines": "manila", "Scotland": "edinburgh", "Wales": "cardiff",
            "the Czech Republic": "prague", "Romania": "bucharest", "Ukraine": "kyiv", "Nigeria": "abuja",
            "Morocco": "rabat", "Saudi Arabia": "riyadh", "Israel": "jerusalem", "Venezuela": "caracas"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SOUNDS = {"a dog": "bark", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a lion": "roar",
          "a sheep": "baa", "a snake": "hiss", "a horse": "neigh"}
PLURALS = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men",
           "woman": "women", "goose": "geese", "person": "people"}
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "day": "night", "happy": "sad",
             "light": "dark", "open": "close", "old": "new", "wet": "dry", "early": "late", "full": "empty",
             "hard": "soft", "high": "low", "left": "right", "win": "lose", "black": "white", "tall": "short",
             "rich": "poor", "strong": "weak"}
COLOURS = {"a banana": "yellow", "grass": "green", "snow": "white", "the sky on a clear day": "blue",
           "coal": "black", "a ripe tomato": "red", "an orange": "orange", "milk": "white",
           "a lemon": "yellow", "a strawberry": "red", "a leaf in summer": "green", "chocolate": "brown"}
FACTS = [
    ("How many days are there in a week?", ["seven", "7"]),
    ("How many hours are in a day?", ["24", "twenty-four"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("How many months are in a year?", ["twelve", "12"]),
    ("How many minutes are in an hour?", ["sixty", "60"]),
    ("How many sides does a triangle have?", ["three", "3"]),
    ("What is the chemical symbol for water?", ["h2o"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "co2"]),
    ("What is the boiling point of water in Celsius?", ["100"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("Which ocean is the largest?", ["pacific"]),
    ("Which organ pumps blood through the body?", ["heart"]),
    ("What star is at the center of our solar system?", ["sun"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
    ("What is the currency of the United States?", ["dollar"]),
    ("What animal is known as man's best friend?", ["dog"]),
    ("What is the largest mammal on Earth?", ["whale"]),
    ("What language is spoken in Spain?", ["spanish"]),
    ("What language is spoken in Brazil?", ["portuguese"]),
    ("What language is spoken in France?", ["french"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What do bees make?", ["honey"]),
    ("What is frozen water called?", ["ice"]),
    ("Which animal is the largest land animal?", ["elephant"]),
    ("What is the freezing point of water in Celsius?", ["0", "zero"]),
    ("Which is the closest planet to the sun?", ["mercury"]),
    ("What do cows drink?", ["water"]),
    ("What is the tallest animal in the world?", ["giraffe"]),
]


def candidates() -> list[dict]:
    items = [{"kind": "capital", "question": f"What is the capital of {c}?", "answers": [a]}
             for c, a in CAPITALS.items()]
    items += [{"kind": "arithmetic", "question": f"What is {a} plus {b}?", "answers": [str(a + b)]}
              for a in range(1, 10) for b in (1, 2, 5)]
    items += [{"kind": "arithmetic", "question": f"What is {a} times {b}?", "answers": [str(a * b)]}
              for a in (2, 3, 5, 10) for b in (2, 3, 4)]
    items += [{"kind": "opposite", "question": f"What is the opposite of {w}? Answer in one word.",
               "answers": [o]} for w, o in OPPOSITES.items()]
    items += [{"kind": "colour", "question": f"What color is {thing}? Answer in one word.", "answers": [c]}
              for thing, c in COLOURS.items()]
    items += [{"kind": "fact", "question": q, "answers": a} for q, a in FACTS]
    items += [{"kind": "sequence", "question": f"What day comes after {d}? Answer in one word.",
               "answers": [DAYS[(i + 1) % 7].lower()]} for i, d in enumerate(DAYS)]
    items += [{"kind": "sequence", "question": f"Which month comes after {m}? Answer in one word.",
               "answers": [MONTHS[(i + 1) % 12].lower()]} for i, m in enumerate(MONTHS)]
    items += [{"kind": "arithmetic", "question": f"What is {a} minus {b}?", "answers": [str(a - b)]}
              for a in (10, 15, 20) for b in (1, 3, 5)]
    items += [{"kind": "one_word", "question": f"What sound does {animal} make? Answer in one word.",
               "answers": [sound]} for animal, sound in SOUNDS.items()]
    items += [{"kind": "one_word", "question": f"What is the plural of {w}? Answer in one word.", "answers": [p]}
              for w, p in PLURALS.items()]
    return items


def as_row(item: dict) -> dict:
    """A candidate as a row of the bundled probe (the retention data's columns)."""
    return {"prompt": item["question"], "demonstration": " | ".join(item["answers"]), "kind": item["kind"]}


def main():
    from sdft import load_model
    from sdft.data.examples import load_examples
    from sdft.eval.evaluation import generate_answers
    from sdft.eval.scorers import contains

    model, tokenizer = load_model()
    items = candidates()
    examples = load_examples([{"prompt": it["question"], "demonstration": "-"} for it in items])
    answers = generate_answers(model, tokenizer, examples, max_new_tokens=40)
    kept = [it for it, a in zip(items, answers) if contains(a, " | ".join(it["answers"]))]
    OUT.write_text("".join(json.dumps(as_row(it)) + "\n" for it in kept))
    kinds = {}
    for it in kept:
        kinds[it["kind"]] = kinds.get(it["kind"], 0) + 1
    print(f"kept {len(kept)} of {len(items)} candidates: {kinds}")


if __name__ == "__main__":
    main()
