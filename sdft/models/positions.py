"""How many positions a model can take, where going past them fails.

A model with a learned table of absolute positions (GPT-2's ``n_positions``) fails at the first position
past it: an ``IndexError`` deep in the embedding on a CPU, a device-side assert that ends the process on
CUDA. Rotary models (every other family sdft trains) run past ``max_position_embeddings``: quality, not a
crash, so they have no limit here. Sequences that would go past the table are one line naming the row
instead: training rows before the weights load where the folder's config.json tells, held-out rows and
prompts before they are answered or scored.
"""
from __future__ import annotations

import json
from pathlib import Path

from sdft.models import hub

LEARNED_POSITIONS = {"gpt2": "n_positions"}  # model_type: the config field of its position table's rows


def _limit(config: dict) -> int | None:
    field = LEARNED_POSITIONS.get(config.get("model_type"))
    size = config.get(field) if field else None
    return size if isinstance(size, int) and size > 0 else None


def position_limit(model) -> int | None:
    """Positions ``model`` (None: the embedded model, a local path or Hub id, or a model object) can take; None where
    it has no hard limit or none can be read."""
    if model is None:
        return None
    if isinstance(model, (str, Path)):
        try:  # a Hub id: its snapshot's config, fetched with the tokenizer before the weights
            return _limit(json.loads((hub.folder_of(model) / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):  # a .gguf, or no readable config.json: loading says why
            return None
    config = getattr(model, "config", None)
    return _limit(config.to_dict()) if hasattr(config, "to_dict") else None


def built_positions(config) -> int | None:
    """The positions a rotary model was trained for (``max_position_embeddings`` of a transformers ``config``),
    None for a model with a learned table (``position_limit``: a hard limit) or none given."""
    if config is None or getattr(config, "model_type", None) in LEARNED_POSITIONS:
        return None
    size = getattr(config, "max_position_embeddings", None)
    return size if isinstance(size, int) and size > 0 else None


def past_built_positions(longest_context: int, max_completion_length: int, built: int | None) -> str | None:
    """A line when the longest context (prompt or teacher context, in tokens) and a whole rollout take more
    positions than the model was trained for (``built_positions``): rotary positions run past them (no error, as
    transformers' generate), but the model's outputs there are untrained, and the user should know."""
    taken = longest_context + max_completion_length - 1  # a generated sequence's last token is never fed
    if built is None or taken <= built:
        return None
    return (f"sdft: the longest context ({longest_context} tokens) and a rollout of max_completion_length="
            f"{max_completion_length} take {taken} positions, past the {built} the model was trained for "
            "(max_position_embeddings): rotary positions run on past them, but the model's outputs there are "
            "untrained; lower max_completion_length unless the model handles longer contexts")


def check_room(tokens: int, limit: int | None, where: str, what: str, fix: str) -> None:
    """One line when a pass over ``tokens`` positions (``what`` it holds, of the row ``where``; a generated
    sequence's last token is never fed, so it takes none) goes past ``limit``."""
    if limit is not None and tokens > limit:
        raise ValueError(f"{where}: {what} take {tokens} positions, past the model's {limit} (n_positions, a learned "
                         f"position table): {fix}")
