"""The optimizer: AdamW, or any optimizer transformers' factory builds by its HF Trainer name (``optim``), over the
trainable parameters grouped for weight decay as the HF Trainer (and so TRL) groups them; and the regrouping that
lets a checkpoint written with one group resume."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

# Parameters the HF Trainer (and so TRL) never decays, by name (its get_decay_parameter_names), besides LayerNorm's.
NO_DECAY_NAMES = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


def decays(name: str, module_type: type | None = None) -> bool:
    """Whether AdamW's weight decay applies to the parameter ``name``: not to biases and norms, as the HF Trainer."""
    return not any(p.search(name.lower()) for p in NO_DECAY_NAMES) and not (
        module_type is not None and issubclass(module_type, torch.nn.LayerNorm))


ADAMW = ("adamw_torch", "adamw_torch_fused")  # sdft's own AdamW (fused wherever torch has it)
# transformers' optimizers that need more than a class and keywords: the Trainer's own loop (LOMO), target modules
# (GaLore, APOLLO), train/eval mode switches (schedule-free), or a device of their own.
REFUSED_PREFIXES = ("galore", "lomo", "adalomo", "apollo", "schedule_free", "adamw_torch_xla", "adamw_torch_npu")


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer as the HF Trainer names and configures it (``optim``, ``optim_args``, the Adam keys)."""

    name: str = "adamw_torch_fused"
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    args: str = ""

    @classmethod
    def from_config(cls, config) -> "OptimizerSettings":
        return cls(config.optim, config.learning_rate, config.weight_decay, (config.adam_beta1, config.adam_beta2),
                   config.adam_epsilon, config.optim_args)

    def factory(self, model=None):
        """(class, keywords) of a name other than AdamW, from transformers' own factory
        (``Trainer.get_optimizer_cls_and_kwargs``); a name it does not know, or whose package is not installed
        (bitsandbytes, torchao), is one line."""
        from transformers import Trainer
        from transformers.training_args import OptimizerNames

        if self.name.startswith(REFUSED_PREFIXES):
            raise ValueError(f"optim={self.name!r}: sdft's loop does not drive it (it needs the HF Trainer's own "
                             "loop, target modules or mode switches); use AdamW, adafactor, sgd, the bitsandbytes "
                             "optimizers, ...")
        try:
            name = OptimizerNames(self.name)
        except ValueError:
            raise ValueError(f"optim={self.name!r}: not an optimizer transformers knows (adamw_torch_fused, "
                             "adafactor, sgd, adamw_8bit, paged_adamw_8bit, ...)") from None
        args = SimpleNamespace(optim=name, optim_args=self.args or None, learning_rate=self.learning_rate,
                               adam_beta1=self.betas[0], adam_beta2=self.betas[1], adam_epsilon=self.eps,
                               weight_decay=self.weight_decay, optim_target_modules=None)
        try:
            return Trainer.get_optimizer_cls_and_kwargs(args, model)
        except (ImportError, ValueError) as err:  # a missing package: ImportError, or ValueError before transformers 5
            given = f" with optim_args={self.args!r}" if self.args else ""
            raise ValueError(f"optim={self.name!r}{given}: {str(err).strip().splitlines()[0]}") from None

    def _reads(self, key: str, value: str, alone: dict | None = None) -> bool:
        """Whether transformers' factory reads ``key`` of optim_args: giving it (the user's value, 0 or 1) changes
        the keywords (``alone``: those without optim_args), or fails to parse. A key the factory sets itself but
        never reads (adafactor's scale_parameter) leaves them as they are."""
        alone = replace(self, args="").factory()[1] if alone is None else alone
        for probe in (value, "0", "1"):
            try:
                if replace(self, args=f"{key}={probe}").factory()[1] != alone:
                    return True
            except (ValueError, TypeError, AttributeError):  # the factory parsed it (and refused the probe)
                return True
        return False

    def check(self) -> None:
        """Before the model loads: the name, its package and its arguments (the optimizer built over one
        stand-in parameter)."""
        if self.name not in ADAMW:
            items = [item for item in self.args.replace(" ", "").split(",") if item]
            for item in items:
                if "=" not in item:
                    raise ValueError(f"optim_args item {item!r}: each is KEY=VALUE, comma-separated (e.g. "
                                     "momentum=0.9,nesterov=true)")
            cls, kwargs = self.factory()
            alone = replace(self, args="").factory()[1]
            unread = [key for key, value in (item.split("=", 1) for item in items)
                      if not self._reads(key, value, alone)]
            if unread:  # transformers' factory takes the keys each optimizer reads and drops the rest
                raise ValueError(f"optim_args {unread[0]!r}: transformers' {self.name} does not read it (it sets "
                                 f"{', '.join(f'{k}={v}' for k, v in kwargs.items() if k != 'lr') or 'none'})")
            try:
                cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
            except (TypeError, ValueError) as err:
                raise ValueError(f"optim={self.name!r} with optim_args={self.args!r}: {err}") from None
        elif self.args:
            raise ValueError(f"optim_args={self.args!r}: sdft's AdamW takes adam_beta1, adam_beta2 and adam_epsilon "
                             "as fields, no optim_args")


def make_optimizer(model, settings: OptimizerSettings):
    """The optimizer over the trainable parameters. AdamW: the fused kernel (one pass, ~9x faster than the
    for-each one on a 2-core CPU for 135M parameters) wherever torch has it for these tensors; any other name
    through transformers' factory. With weight decay, two groups as the HF Trainer's: biases and norms are not
    decayed."""
    named = [(n, p, type(model.get_submodule(n.rpartition(".")[0]))) for n, p in model.named_parameters()
             if p.requires_grad]
    params = [p for _, p, _ in named]
    if settings.name in ADAMW:
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        cls, kwargs = torch.optim.AdamW, {"lr": settings.learning_rate, "betas": settings.betas,
                                          "eps": settings.eps, "fused": fused}
    else:
        cls, kwargs = settings.factory(model)
    if settings.weight_decay == 0.0:  # one group: checkpoints written before the groups load as they were
        return cls(params, **kwargs, weight_decay=0.0)
    groups = [{"params": [p for n, p, t in named if decays(n, t)], "weight_decay": settings.weight_decay},
              {"params": [p for n, p, t in named if not decays(n, t)], "weight_decay": 0.0}]
    optimizer = cls([g for g in groups if g["params"]], **kwargs)
    optimizer.model_order = params  # what regroup maps a one-group checkpoint's indices onto
    return optimizer


def regroup(state: dict, optimizer) -> dict:
    """``state`` (an optimizer state dict of one parameter group: a checkpoint written before biases and norms were
    kept out of weight decay) laid out in ``optimizer``'s groups, each parameter keeping its moments; any other
    ``state`` as it is."""
    order = getattr(optimizer, "model_order", None)
    if order is None or len(state["param_groups"]) != 1 or len(optimizer.param_groups) == 1:
        return state
    old = state["param_groups"][0]
    position = {id(p): k for k, p in enumerate(order)}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    moments = {i: state["state"][position[id(p)]] for i, p in enumerate(flat) if position[id(p)] in state["state"]}
    groups, start = [], 0
    for group in optimizer.param_groups:
        size = len(group["params"])
        groups.append({**{k: v for k, v in old.items() if k != "params"}, "weight_decay": group["weight_decay"],
                       "params": list(range(start, start + size))})
        start += size
    return {"state": moments, "param_groups": groups}
