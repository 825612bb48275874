"""Writing a model as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

Works for models loaded from GGUF too (transformers refuses ``save_pretrained`` on those: the weights
are copied into a fresh model built from the same config first). ``config.architectures`` is set so
peers such as TRL, vLLM or ``pipeline`` can build the model from the path alone.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def _write_folder(out: Path, model, tokenizer, **save_options) -> Path:
    """Save into a temporary sibling and rename it over ``out``: a crash never leaves a half-written
    export under the final name."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **save_options)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


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
    return _write_folder(out, model, tokenizer, safe_serialization=True)


def export_model(model, tokenizer, out, merge_lora: bool = False) -> Path:
    """A loadable folder from a trained model. LoRA: the peft adapter (``PeftModel.from_pretrained``
    over the base model), or with ``merge_lora`` the merged full model; otherwise the full model."""
    out = Path(out)
    if not hasattr(model, "peft_config"):
        return save_hf_folder(model, tokenizer, out)
    if merge_lora:
        import copy

        return save_hf_folder(copy.deepcopy(model).merge_and_unload(), tokenizer, out)
    return _write_folder(out, model, tokenizer)


def export_checkpoint(checkpoint, out, model=None, merge_lora: bool = False) -> Path:
    """``sdft export``: rebuild the trained model from a checkpoint and write it as ``export_model`` does.

    ``model``: the base model's path (default: the one the checkpoint records; None there means the
    embedded SmolLM2).
    """
    from .checkpoint import CheckpointError, checkpoint_state, damage, load_trainable
    from .config import SDFTConfig
    from .models import load_model
    from .trainer import apply_lora

    problem = damage(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{checkpoint} is not a complete sdft checkpoint: {problem}")
    state = checkpoint_state(checkpoint)
    source = model if model is not None else state.get("model")
    if source == OBJECT_SOURCE:
        raise ValueError(f"{checkpoint} was trained from a model object: pass the base model's path (--model)")
    config = SDFTConfig.from_dict(state["config"])
    base, tokenizer = load_model(source)
    if config.use_lora:
        base = apply_lora(base, config)
    load_trainable(checkpoint, base)
    return export_model(base, tokenizer, out, merge_lora)


OBJECT_SOURCE = "<model object>"
