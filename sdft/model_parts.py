"""Reaching the decoder stack and the LM head of a (possibly peft-wrapped) causal LM."""
from __future__ import annotations

import contextlib


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model):
    """The decoder stack returning final (normed) hidden states; LoRA layers live inside it."""
    return base_model(model).get_decoder()


@contextlib.contextmanager
def eval_mode(model):
    """Run a block with the model in eval mode (no dropout), then restore its train/eval state."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
