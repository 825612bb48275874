"""Looking through a peft wrapper, and running a block in eval mode."""
from __future__ import annotations

import contextlib


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
