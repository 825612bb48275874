"""The learning rate of each optimizer step: transformers' schedulers, by the HF Trainer's names and keywords.

Each step's rate is what the Trainer's scheduler (``transformers.get_scheduler``) gives that step, read from
the scheduler's own rule as a function of the step, so a resumed run continues the same schedule without
scheduler state in its checkpoints. One difference in naming: sdft's ``constant`` keeps its warmup (HF's
``constant_with_warmup``; HF's plain ``constant`` has none), as it always has.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import dataclass

HF_NAME = {"constant": "constant_with_warmup"}
STEP_ARGUMENTS = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")  # set by the run
MIN_LR_SCHEDULES = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")


def warmup_steps(config) -> int:
    """The warmup's optimizer steps: ``warmup_steps``, or ``warmup_ratio`` of ``max_steps`` rounded up (HF's
    ``get_warmup_steps``)."""
    return config.warmup_steps or math.ceil(config.max_steps * config.warmup_ratio)


def schedule_kwargs(kind: str, kwargs: dict, min_lr_rate: float) -> dict:
    """The keywords of schedule ``kind``: ``lr_scheduler_kwargs``, with sdft's ``min_lr_rate`` where the
    schedule ends at a floor (unless those keywords give ``min_lr`` or ``min_lr_rate`` themselves)."""
    kwargs = dict(kwargs)
    if kind in MIN_LR_SCHEDULES and not {"min_lr", "min_lr_rate"} & set(kwargs):
        kwargs["min_lr_rate"] = min_lr_rate
    return kwargs


def _function(kind: str):
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    try:
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(HF_NAME.get(kind, kind))]
    except (KeyError, ValueError):
        raise ValueError(f"lr_scheduler_type={kind!r} is not a schedule of the installed transformers") from None


@functools.lru_cache(maxsize=16)
def _rule(kind: str, warmup: int, max_steps: int, learning_rate: float, kwargs: str):
    """The multiplier of the rate at each step, as HF's scheduler for these settings computes it (``kwargs`` as
    JSON, to be hashable). The scheduler reads the base rate for keywords given in rates (``min_lr``,
    ``lr_end``), so its optimizer holds ``learning_rate``."""
    import torch

    function = _function(kind)
    names = set(inspect.signature(function).parameters)
    values = json.loads(kwargs)
    unknown = sorted(set(values) - (names - set(STEP_ARGUMENTS)))
    if unknown:
        takes = ", ".join(sorted(names - set(STEP_ARGUMENTS))) or "none"
        raise ValueError(f"lr_scheduler_kwargs {unknown[0]!r}: not a keyword of HF's {kind} schedule (it takes: "
                         f"{takes})")
    steps = {"num_warmup_steps": warmup, "num_training_steps": max_steps}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    try:
        scheduler = function(optimizer, **{k: v for k, v in steps.items() if k in names}, **values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lr_scheduler_kwargs={values!r} for {kind}: {err}") from None
    return scheduler.lr_lambdas[0]


@dataclass(frozen=True)
class LRSchedule:
    """The rate of each optimizer step: ``learning_rate`` times HF's multiplier for schedule ``kind`` with
    ``warmup`` warmup steps over ``max_steps``."""

    learning_rate: float
    kind: str
    warmup: int
    max_steps: int
    kwargs: str = "{}"  # the schedule's keywords, as JSON

    @classmethod
    def from_config(cls, config) -> "LRSchedule":
        kwargs = schedule_kwargs(config.lr_scheduler_type, config.lr_scheduler_kwargs, config.min_lr_rate)
        return cls(config.learning_rate, config.lr_scheduler_type, warmup_steps(config), config.max_steps,
                   json.dumps(kwargs, sort_keys=True))

    def check(self) -> None:
        """A one-line error if HF's scheduler refuses these settings (an unknown or missing keyword)."""
        _rule(self.kind, self.warmup, self.max_steps, self.learning_rate, self.kwargs)

    def at(self, step: int) -> float:
        """The rate for optimizer step ``step`` (0-based)."""
        return self.learning_rate * _rule(self.kind, self.warmup, self.max_steps, self.learning_rate,
                                          self.kwargs)(step)

    def apply(self, optimizer, step: int):
        for group in optimizer.param_groups:
            group["lr"] = self.at(step)
