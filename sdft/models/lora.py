"""LoRA adapters through peft, from the config's lora_* values (functions take the values they use)."""
from __future__ import annotations

import contextlib
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

    check_targets(model, settings.target_modules)
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=lora_targets(settings.target_modules), task_type="CAUSAL_LM")
    with quiet_peft():
        return get_peft_model(model, lora)


def check_targets(model, names) -> None:
    """One line naming the ``lora_target_modules`` that match no linear layer of ``model`` (a meta model will
    do: only names are read), with the names its linear layers have."""
    import torch

    if lora_targets(names) in (None, "all-linear"):
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and "." in name})
    missing = [n for n in names if not any(full == n or full.endswith("." + n) for full, _ in model.named_modules())]
    if missing:
        raise ValueError(f"lora_target_modules {', '.join(missing)}: no such layer in the model; its linear layers "
                         f"are {', '.join(linear)} (or all-linear, or auto: peft's default for its family)")


@contextlib.contextmanager
def quiet_peft():
    """peft reads transformers' old ``is_gradient_checkpointing`` when it wraps a model; the user can do nothing
    about its FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def lora_values(peft_config) -> dict:
    """A peft ``LoraConfig`` as sdft's LoRA keys ({} for None); what sdft's adapters cannot honour is refused."""
    if peft_config is None:
        return {}
    if getattr(peft_config, "use_dora", False):
        raise ValueError("LoraConfig(use_dora=True): sdft trains plain LoRA adapters; drop use_dora")
    if getattr(peft_config, "modules_to_save", None):
        raise ValueError(f"LoraConfig(modules_to_save={peft_config.modules_to_save!r}): sdft trains the adapters "
                         "only; train those modules fully with use_lora off, or drop modules_to_save")
    if getattr(peft_config, "bias", "none") != "none":
        raise ValueError(f"LoraConfig(bias={peft_config.bias!r}): sdft trains no biases; use bias='none'")
    modules = peft_config.target_modules
    targets = ["auto"] if modules is None else [modules] if isinstance(modules, str) else sorted(modules)
    return dict(use_lora=True, lora_r=int(peft_config.r), lora_alpha=int(peft_config.lora_alpha),
                lora_dropout=float(peft_config.lora_dropout), lora_target_modules=targets)


def adapters_of(model) -> dict:
    """The LoRA keys of a model that already carries peft adapters ({} for any other model): a run trains
    those adapters and records them, so its checkpoints rebuild the same model (``sdft export``, resume).
    One adapter, named ``default`` (what ``get_peft_model`` makes), and a LoRA one; else one line."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return {}
    if list(configs) != ["default"]:
        raise ValueError(f"the model carries peft adapters {sorted(configs)}: sdft trains one, named 'default' "
                         "(get_peft_model's); pass the base model with use_lora=true, or a model with one adapter")
    config = configs["default"]
    if type(config).__name__ != "LoraConfig":
        raise ValueError(f"the model carries a {type(config).__name__} adapter: sdft trains LoRA adapters")
    return lora_values(config)

