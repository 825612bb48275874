"""Looking through a peft wrapper, running a block in eval mode, and naming the KV cache."""
from __future__ import annotations

import contextlib
import functools


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def eval_mode(model):
    """Run a block with the model in eval mode (no dropout), then restore its train/eval state."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@functools.cache
def cache_name() -> str:
    """The keyword and output field transformers gives the KV cache.

    ``cache`` in transformers 5.2x, which warns on the old ``past_key_values`` (to be removed in
    5.40); ``past_key_values`` before. Read from the library's own output class, not its version.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPast
    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def kv_cache(output):
    """The KV cache of a model's output (None when the model kept none)."""
    return getattr(output, cache_name(), None)


def passing_cache(cache) -> dict:
    """Keyword arguments that hand ``cache`` to a model's forward under the library's name for it."""
    return {cache_name(): cache}


def enable_checkpointing(model) -> None:
    """Recompute decoder activations in backward (non-reentrant), under either transformers name.

    transformers 5.2x calls it ``activation_checkpointing_enable`` and warns on the old
    ``gradient_checkpointing_enable`` (to be removed in v6); older versions have only the old one.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
