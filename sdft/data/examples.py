"""Loading SDFT examples: a prompt and a demonstration, from a file or Hub id (``sdft.data.sources``), a list
or a HF Dataset.

Accepted columns: ``prompt`` (a string or chat messages) and ``demonstration`` (TRL's
``privileged_context`` and ``completion`` are accepted too; a messages-form completion is joined), or
TRL's conversational SFT column ``messages``: its last (assistant) turn is the demonstration.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdft.data.sources import HELD_OUT_SPLIT, read_rows

DEMO_KEYS = ("demonstration", "privileged_context", "completion")
ROLES = ("system", "user", "assistant", "tool")
PLAIN = "plain"  # the role of a prompt given as plain text (TRL's standard format): tokenized without a template


@dataclass(frozen=True)
class Example:
    prompt: tuple  # chat messages, each a (role, content) pair
    demonstration: str
    where: str = field(default="", compare=False)  # the row it came from (``file.jsonl:LINE``), for messages

    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]


def as_plain(example: Example) -> Example:
    """``example`` with its prompt as plain text (TRL's standard format: no chat template), from one user turn."""
    (role, text), = example.prompt
    return Example(((PLAIN, text),), example.demonstration, example.where)


def data_fingerprint(examples: list[Example]) -> dict:
    """The rows a run trains on, as a checkpoint records them: their count and a digest of their text
    (a resume on other data says so)."""
    import hashlib

    text = json.dumps([[list(map(list, ex.prompt)), ex.demonstration] for ex in examples], ensure_ascii=False)
    return {"rows": len(examples), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _text_parts(content, where: str):
    """A message's content as text: a string, or the chat format's list of parts when every part is
    ``{"type": "text", "text": ...}`` (joined); anything else is returned as it is, for the caller's check."""
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = sorted({str(p.get("type")) for p in content} - {"text"})
        if kinds:
            raise ValueError(f"{where} has {', '.join(kinds)} content: sdft trains on text only")
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    return content


def to_messages(value, where: str) -> tuple:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: 'prompt' is empty")
        return (("user", value),)
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        turns = []
        for k, m in enumerate(value):
            if "role" not in m or "content" not in m:
                raise ValueError(f"{where}: each prompt message needs 'role' and 'content', got {sorted(map(str, m))}")
            content = _text_parts(m["content"], f"{where}: prompt message {k}")
            if m["role"] not in ROLES or not isinstance(content, str):
                raise ValueError(f"{where}: prompt message {k} needs a role of {', '.join(ROLES)} and text content, "
                                 f"got role {m['role']!r} and {type(m['content']).__name__} content")
            turns.append((m["role"], content))
        if not any(role == "user" for role, _ in turns):
            raise ValueError(f"{where}: prompt messages hold no user turn")
        return tuple(turns)
    raise ValueError(f"{where}: 'prompt' must be a string or a list of chat messages, got {type(value).__name__}")


def _as_text(value, where: str) -> str:
    if isinstance(value, list):
        value = [{**m, "content": _text_parts(m.get("content"), f"{where}: the demonstration")}
                 if isinstance(m, dict) else m for m in value]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
            raise ValueError(f"{where}: a demonstration given as messages needs dicts with text 'content'")
        value = "".join(m["content"] for m in value if m.get("role", "assistant") == "assistant")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: the demonstration is empty or not text")
    return value


def _split_messages(messages, where: str) -> dict:
    """TRL's conversational SFT row (``messages``, ending in the assistant's answer) as a prompt (the turns
    before that answer) and its demonstration (the answer)."""
    if not (isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant"):
        raise ValueError(f"{where}: 'messages' must be a list of chat messages, a user turn and then the "
                         "assistant's answer (the answer becomes the demonstration; the turns before it, the prompt)")
    return {"prompt": messages[:-1], "demonstration": messages[-1].get("content")}


COLUMNS = ("prompt", "messages") + DEMO_KEYS  # the columns a row is read by (column_map's keys)


def check_column_map(name: str, value: dict) -> dict:
    """``value`` if it maps columns sdft reads to names of dataset columns (torchtune's ``column_map``: e.g.
    ``{"prompt": "question", "demonstration": "answer"}``); otherwise a one-line error naming ``name``."""
    for ours, theirs in value.items():
        if ours not in COLUMNS:
            raise ValueError(f"{name} key {ours!r}: sdft reads the columns {', '.join(COLUMNS)}")
        if not isinstance(theirs, str) or not theirs:
            raise ValueError(f"{name} {ours!r} must name a column of the dataset, got {theirs!r}")
    return value


def _mapped(row, column_map: dict, where: str):
    """``row`` with each of ``column_map``'s columns read from the dataset column it names."""
    if not column_map or not isinstance(row, dict):
        return row
    missing = [theirs for theirs in column_map.values() if theirs not in row]
    if missing:
        raise ValueError(f"{where}: no column {missing[0]!r} for column_map (columns present: {sorted(row)})")
    return {**{k: v for k, v in row.items() if k not in column_map},
            **{ours: row[theirs] for ours, theirs in column_map.items()}}


def to_example(row: dict, where: str) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a mapping with 'prompt' and 'demonstration', got {type(row).__name__}")
    if "prompt" not in row and "messages" in row:
        row = _split_messages(row["messages"], where)
    if "prompt" not in row:
        raise ValueError(f"{where}: missing field 'prompt' (fields present: {sorted(row)})")
    key = next((k for k in DEMO_KEYS if row.get(k) is not None), None)
    if key is None:
        empty = [k for k in DEMO_KEYS if k in row]
        if empty:  # a null in a column (a HF Dataset fills a row's missing column with None)
            raise ValueError(f"{where}: {' and '.join(repr(k) for k in empty)} {'is' if len(empty) == 1 else 'are'} "
                             "null: every row needs its demonstration")
        raise ValueError(f"{where}: missing field 'demonstration' (or TRL's 'privileged_context'); "
                         f"fields present: {sorted(row)}")
    return Example(to_messages(row["prompt"], where), _as_text(row[key], where), where)


def _columns_to_rows(columns: dict) -> list[dict]:
    """Rows of a column mapping (``{"prompt": [...], "demonstration": [...]}``, as ``Dataset.from_dict``
    takes); a mapping of single values (one row) is refused, since iterating it would yield its keys."""
    splits = [k for k, v in columns.items() if hasattr(v, "column_names")]  # a DatasetDict: splits, not columns
    if splits:
        raise ValueError(f"dataset: a mapping of splits ({', '.join(map(str, splits))}), such as load_dataset "
                         f"returns: pass one split, e.g. dataset[{splits[0]!r}]")
    lengths = {len(v) if isinstance(v, (list, tuple)) else None for v in columns.values()}
    if None in lengths or len(lengths) != 1:
        raise ValueError("dataset: a mapping must hold columns, lists of equal length, e.g. "
                         "{'prompt': [...], 'demonstration': [...]}; pass one row as [row]")
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def load_examples(data, name: str = "dataset", split: str = "train", column_map: dict | None = None) -> list[Example]:
    """Examples from a file, saved dataset or Hub id (``sdft.data.sources``; ``split``: the Hub split when the
    id names none), a list of dicts (or of ``Example``), a mapping of columns, or anything iterable of dicts
    (HF Dataset); ``name`` names a dataset that is not a file in messages; ``column_map`` (``check_column_map``)
    names the dataset's columns that hold sdft's."""
    if isinstance(data, (str, Path)):
        rows, wheres, name = read_rows(data, split)
    elif isinstance(data, dict):
        rows, wheres = _columns_to_rows(data), None
    else:
        try:
            rows, wheres = list(data), None
        except TypeError:
            raise TypeError(f"{name} must be a .jsonl/.json path, a list of rows, a mapping of columns or a "
                            f"HF Dataset, got {type(data).__name__}") from None
    if wheres is None:
        wheres = [f"{name} row {i}" for i in range(len(rows))]
    examples = [row if isinstance(row, Example) else to_example(_mapped(row, column_map, where), where)
                for row, where in zip(rows, wheres)]
    if not examples:
        raise ValueError(f"{name} holds no examples")
    return examples


def load_prompts(data, split: str = HELD_OUT_SPLIT, column_map: dict | None = None) -> list:
    """The prompts of a dataset named as ``load_examples`` takes it (its ``prompt`` column, or the turns before
    the answer of ``messages``), checked as training's prompts are; no demonstration is needed."""
    rows, wheres, name = read_rows(data, split)
    wheres = wheres or [f"{name} row {i}" for i in range(len(rows))]
    prompts = []
    for row, where in zip(rows, wheres):
        row = _mapped(row, column_map, where)
        if isinstance(row, dict) and "prompt" not in row and "messages" in row:
            row = _split_messages(row["messages"], where)
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{where}: a row needs a 'prompt' field (or 'messages')")
        to_messages(row["prompt"], where)
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{name} holds no prompts")
    return prompts


SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def named_sets(data) -> dict | None:
    """The sets of a mapping of names to datasets (the Trainer's ``eval_dataset={name: dataset}``, a
    DatasetDict among them), or None where ``data`` is one dataset (a mapping of columns holds lists of
    values, never of rows)."""
    def one_set(value) -> bool:
        rows = isinstance(value, (list, tuple)) and bool(value) and all(isinstance(r, (dict, Example)) for r in value)
        return rows or isinstance(value, (str, Path)) or hasattr(value, "column_names")

    if not isinstance(data, dict) or not data or not all(one_set(v) for v in data.values()):
        return None
    for key in data:
        if not isinstance(key, str) or not SET_NAME.fullmatch(key) or key.startswith("retention"):
            raise ValueError(f"eval_dataset: the set name {key!r} is not a plain name (letters, digits, _ . -; "
                             "not retention...): it becomes part of the metric names (eval_NAME_score)")
    return dict(data)


def load_eval_sets(data, column_map: dict | None = None) -> list[Example] | dict[str, list[Example]]:
    """Held-out rows: one dataset as ``load_examples`` reads it, or a mapping of names to datasets (each
    evaluated apart, its figures named ``NAME_score``, ``NAME_perplexity``, ...)."""
    sets = named_sets(data)
    if sets is None:
        return load_examples(data, "eval_dataset", HELD_OUT_SPLIT, column_map)
    return {key: load_examples(value, f"eval_dataset[{key!r}]", HELD_OUT_SPLIT, column_map)
            for key, value in sets.items()}


def eval_sets(held_out) -> dict:
    """Held-out rows as ``load_eval_sets`` gives them, always as name -> rows ("" names a lone set)."""
    if held_out is None:
        return {}
    return dict(held_out) if isinstance(held_out, dict) else {"": held_out}
