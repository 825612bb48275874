"""Which attention implementation the model runs (``attn_implementation``), checked before it loads.

* ``auto``: the model's own (transformers loads ``sdpa``; a model object keeps what it was built with);
* ``sdpa`` / ``eager``: the prefix tree's passes run (``sdft.prefix.packed``), with its mask as
  ``tree_attention`` says;
* ``flash_attention_2`` (the ``flash-attn`` package, ``pip install 'sdft[flash]'``; CUDA, bf16 compute):
  flash-attn takes no tree mask, so prompts are shared through the KV cache instead: each context runs
  once, its cache is expanded over the G rollouts, and transformers unpads every pass into flash-attn's
  varlen kernels (no attention on padding). Rollouts decode on the same expanded cache. Under
  gradient checkpointing transformers turns the cache off, so the student's pass there runs every
  rollout with its whole prompt (``sdft.prefix.packed`` warns); the sdpa tree shares prompts either way.

The package imports and runs without flash-attn; asking for it where it cannot run is one line.
"""
from __future__ import annotations

import contextlib
import importlib.util

from sdft.models.parts import base_model

IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
FLASH = ("flash_attention_2",)


def check_implementation(name: str, device_type: str, precision: str, dtype: str) -> None:
    """One line where ``name`` cannot run here: flash-attn missing, not on CUDA, or fp32 compute
    (``precision`` is ``mixed_precision`` resolved for the device, ``dtype`` the weights' load dtype)."""
    if name not in FLASH:
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError(f"attn_implementation={name} needs the flash-attn package (CUDA only): "
                         "pip install 'sdft[flash]', or use attn_implementation=sdpa")
    if device_type != "cuda":
        raise ValueError(f"attn_implementation={name} runs on CUDA only; this run's device is {device_type}")
    if precision not in ("bf16", "fp16") and dtype != "bfloat16":
        raise ValueError(f"attn_implementation={name} computes in bf16 or fp16: set mixed_precision=bf16 (or auto "
                         "on a GPU with bf16, fp16 on one without) or dtype=bfloat16")


def use_implementation(model, name: str):
    """Switch ``model`` to attention ``name`` for a run (``auto``: as it is; a peft wrapper: its base model).
    Returns the function that switches it back: after the run the model attends as before, so code that
    runs it outside the run's autocast (an fp32 evaluation) never meets flash-attn's bf16-only kernels."""
    base = base_model(model)
    before = base.config._attn_implementation
    if name == "auto" or before == name:
        return lambda: None
    base.set_attn_implementation(name)
    return lambda: base.set_attn_implementation(before)


@contextlib.contextmanager
def attention_as(model, name: str):
    """Run ``model``'s attention through transformers' ``name`` implementation for the duration (its
    config and a multimodal model's text config), restored afterwards: no weights or modules change."""
    configs = [c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl
