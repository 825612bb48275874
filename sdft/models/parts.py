"""Looking through a peft wrapper, running a block in eval mode, and naming the KV cache."""
from __future__ import annotations

import contextlib
import functools
import inspect


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


def _library_cache_name() -> str:
    """``cache`` in transformers 5.2x (which warns on the old ``past_key_values`` and drops it in
    5.40), ``past_key_values`` before; read from the library's output class, not its version."""
    from transformers.modeling_outputs import BaseModelOutputWithPast
    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@functools.lru_cache(maxsize=None)
def _forward_cache_name(cls) -> str:
    """The KV-cache keyword of ``cls.forward``: its own parameter name where it names one (a remote-code
    model may keep the old name, and would silently ignore the new one in its ``**kwargs``), else the
    library's (a wrapper that forwards ``**kwargs``)."""
    params = inspect.signature(cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return _library_cache_name()


def passing_cache(model, cache) -> dict:
    """Keyword arguments that hand ``cache`` to ``model``'s forward under the name it takes."""
    return {_forward_cache_name(type(base_model(model))): cache}


def kv_cache(output):
    """The KV cache of a model's output, under either field name (None when the model kept none)."""
    fields = getattr(output, "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        if name in fields:
            return getattr(output, name)
    return None


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
