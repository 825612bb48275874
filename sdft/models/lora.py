"""LoRA adapters through peft, from the config's lora_* values (functions take the values they use)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass


def lora_targets(names: list[str]):
    """``lora_target_modules`` as peft takes it: ``all-linear`` (every linear layer but the head) and
    ``auto`` (peft's default for the model's family, e.g. q_proj, v_proj for Llama) resolved by peft."""
    if list(names) == ["all-linear"]:
        return "all-linear"
    if list(names) == ["auto"]:
        return None
    return list(names)


@dataclass(frozen=True)
class LoraSettings:
    """The adapters a run trains: rank, alpha, dropout and target modules (the config's lora_* values)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple

    @classmethod
    def from_config(cls, config) -> "LoraSettings":
        return cls(config.lora_r, config.lora_alpha, config.lora_dropout, tuple(config.lora_target_modules))


def apply_lora(model, settings: LoraSettings):
    """``model`` wrapped with peft adapters as ``settings`` asks."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=lora_targets(settings.target_modules), task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads transformers' old name; the user can do nothing about it
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)
