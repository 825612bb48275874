"""Scorers for evaluation on the user's data: (answer, demonstration) -> score in [0, 1].

``exact``: the stripped texts are equal. ``normalized``: equal after lower-casing, dropping
punctuation and English articles, and collapsing whitespace (SQuAD's normalisation). ``json``: both
parse as JSON and are equal as values (key order and spacing do not matter). ``regex:PATTERN``: the
first match of PATTERN (its first group, if it has one) is the same in the answer and in the
demonstration, e.g. ``regex:####\\s*(-?\\d+)`` for GSM8K-style final answers. ``contains``: one of the
demonstration's ``|``-separated alternatives appears in the answer as a whole word, case-insensitive
(the retention probe's scorer: "seven | 7" accepts "There are 7 days"). In the API any
callable ``(answer, demonstration) -> float | bool`` can be passed instead of a name.
"""
from __future__ import annotations

import inspect
import json
import re
import string
from typing import Callable

Scorer = Callable[[str, str], float]
NAMES = ("exact", "normalized", "json", "contains", "regex:PATTERN")


def exact(answer: str, demonstration: str) -> float:
    return float(answer.strip() == demonstration.strip())


def _normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalized(answer: str, demonstration: str) -> float:
    return float(_normalize(answer) == _normalize(demonstration))


def json_equal(answer: str, demonstration: str) -> float:
    try:
        return float(json.loads(answer.strip()) == json.loads(demonstration.strip()))
    except json.JSONDecodeError:
        return 0.0


def contains(answer: str, demonstration: str) -> float:
    text = answer.lower()
    alternatives = [a.strip().lower() for a in demonstration.split("|") if a.strip()]
    return float(any(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", text) for a in alternatives))


def regex_scorer(pattern: str) -> Scorer:
    compiled = re.compile(pattern)

    def extract(text: str):
        found = compiled.search(text)
        if found is None:
            return None
        return found.group(1) if compiled.groups else found.group(0)

    def score(answer: str, demonstration: str) -> float:
        got = extract(answer)
        return float(got is not None and got == extract(demonstration))

    score.__name__ = f"regex:{pattern}"
    return score


def get_scorer(spec) -> Scorer:
    """A scorer from its name (see the module docstring) or a callable; a bad name is a one-line error."""
    if callable(spec):
        try:
            inspect.signature(spec).bind("answer", "demonstration")
        except TypeError:
            raise ValueError(f"eval_scorer {getattr(spec, '__name__', type(spec).__name__)}: a scorer is called as "
                             "scorer(answer, demonstration) -> float; this one does not take those two "
                             "arguments") from None
        except ValueError:  # no signature to read (some builtins): it is called as it is
            pass
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"eval_scorer must be a name or a callable, got {type(spec).__name__}")
    if spec.startswith("regex:"):
        try:
            return regex_scorer(spec[len("regex:"):])
        except re.error as err:
            raise ValueError(f"eval_scorer {spec!r}: not a valid regular expression ({err})") from None
    named = {"exact": exact, "normalized": normalized, "json": json_equal, "contains": contains}
    if spec not in named:
        raise ValueError(f"unknown eval_scorer {spec!r}; expected one of {', '.join(NAMES)}")
    return named[spec]
