"""Writing a model as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

Works for models loaded from GGUF too (transformers refuses ``save_pretrained`` on those: the weights
are copied into a fresh model built from the same config first). ``config.architectures`` is set so
peers such as TRL, vLLM or ``pipeline`` can build the model from the path alone.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_hf_folder(model, tokenizer, out) -> Path:
    """Save ``model`` (safetensors + config + generation config) and ``tokenizer`` to ``out`` atomically."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export target {out} exists and is not a folder")
    config = model.config
    config.architectures = [type(model).__name__]
    if getattr(config, "quantization_config", None) is not None or getattr(model, "is_quantized", False):
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(model.state_dict())
        model = fresh
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
