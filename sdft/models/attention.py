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
    if precision != "bf16" and dtype != "bfloat16":
        raise ValueError(f"attn_implementation={name} computes in bf16: set mixed_precision=bf16 (or auto on a "
                         "GPU with bf16) or dtype=bfloat16")


def use_implementation(model, name: str):
    """``model`` running attention ``name`` (``auto``: as it is); a peft wrapper switches its base model."""
    if name == "auto":
        return model
    base = base_model(model)
    if base.config._attn_implementation != name:
        base.set_attn_implementation(name)
    return model
