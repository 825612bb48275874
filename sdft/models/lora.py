"""LoRA adapters through peft, from the config's lora_* values (functions take the values they use)."""
from __future__ import annotations

import warnings


def lora_targets(names: list[str]):
    """``lora_target_modules`` as peft takes it: ``all-linear`` (every linear layer but the head) and
    ``auto`` (peft's default for the model's family, e.g. q_proj, v_proj for Llama) resolved by peft."""
    if list(names) == ["all-linear"]:
        return "all-linear"
    if list(names) == ["auto"]:
        return None
    return list(names)


def apply_lora(model, config):
    """``model`` wrapped with peft adapters as ``config`` (lora_r, lora_alpha, lora_dropout,
    lora_target_modules) asks."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(config.lora_target_modules), task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads transformers' old name; the user can do nothing about it
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)
