"""Whether a tokenizer's ids fit the model's embedding rows.

A tokenizer with more ids than the model embeds (another model's tokenizer, or tokens added without
``model.resize_token_embeddings``) fails at the first id past the rows: an ``IndexError`` deep in the
embedding on a CPU, a device-side assert that ends the process on CUDA. The pair is refused in one line
instead, before the weights load where the folder's config.json gives the rows.
"""
from __future__ import annotations

import json
from pathlib import Path


def embedding_rows(model) -> int | None:
    """Rows of ``model``'s input embedding, None where it has none sdft can read."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return None


def config_rows(folder) -> int | None:
    """``vocab_size`` of a model folder's config.json (its text model's, for a multimodal config)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def check_vocabulary(tokenizer, rows: int | None, where) -> None:
    """One line when ``tokenizer`` can give ids past the model's ``rows`` embedding rows."""
    size = len(tokenizer)
    if rows is None or size <= rows:
        return
    raise ValueError(f"{where}: the tokenizer has {size} token ids but the model embeds {rows} "
                     f"(vocab_size): ids {rows}-{size - 1} cannot be embedded. Use the model's own tokenizer, or, "
                     "where tokens were added to it, model.resize_token_embeddings(len(tokenizer)) and save both")
