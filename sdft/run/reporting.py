"""Run logging beside metrics.jsonl: TensorBoard and/or Weights & Biases (offline unless told).

Scalars use TRL's SDFT names where they mean the same (``self_distillation/distillation_loss``,
``completions/mean_length`` ...), under ``train/`` and ``eval/`` as the transformers Trainer logs
them, so dashboards built for TRL runs read ours.
"""
from __future__ import annotations

import importlib.util
import math
import os
import socket
from datetime import datetime
from pathlib import Path

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}

# our metrics.jsonl key -> TRL / transformers Trainer name
TRL_NAMES = {
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
    "mean_completion_length": "completions/mean_length",
    "shortest_completion": "completions/min_length",
    "longest_completion": "completions/max_length",
    "clipped_ratio": "completions/clipped_ratio",
    "mean_terminated_length": "completions/mean_terminated_length",
    "shortest_terminated": "completions/min_terminated_length",
    "longest_terminated": "completions/max_terminated_length",
    "tokens_per_s": "tokens_per_second",
    "tokens": "sdft/step_tokens",  # this step's completion tokens (TRL's num_tokens counts all tokens seen)
    "tokens_processed": "tokens_processed",
    "peak_memory_mib": "peak_memory_mib",
    "seconds": "step_time",
    "rollout_seconds": "timing/rollouts",
    "loss_seconds": "timing/loss_and_backward",
}


def check_backends(report_to: list[str]) -> None:
    """A one-line error, before any model loads, for a backend whose package is missing."""
    for name in report_to:
        if name != "none" and importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(f"report_to={name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}")


def train_scalars(record: dict) -> dict[str, float]:
    """A step's metrics under TRL's names (the SDFT loss also as self_distillation/distillation_loss)."""
    out = {TRL_NAMES[k]: float(v) for k, v in record.items()
           if k in TRL_NAMES and isinstance(v, (int, float)) and math.isfinite(v)}
    if record.get("divergence") != "sft_cross_entropy" and "loss" in out:
        out["self_distillation/distillation_loss"] = out["loss"]
    return out


EVAL_NAMES = {"score": "score", "perplexity": "perplexity", "retention_score": "retention/score",
              "retention_text_perplexity": "retention/text_perplexity"}


def eval_scalars(record: dict) -> dict[str, float]:
    """An evaluation's figures: the new skill's score and perplexity, and what the run kept (retention/...)."""
    return {name: float(record[key]) for key, name in EVAL_NAMES.items() if key in record}


def run_name() -> str:
    """A TensorBoard run's folder under ``runs/``, named as transformers' Trainer names it (date and host),
    so a resumed or repeated run is a run of its own beside the earlier ones."""
    return datetime.now().strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname()


class _TensorBoard:
    def __init__(self, output_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "runs" / run_name()))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, scalars: dict[str, float], step: int):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _Wandb:
    def __init__(self, output_dir: Path, config: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sdft"), dir=str(output_dir), mode=mode,
                              config=config, reinit="finish_previous")

    def log(self, scalars: dict[str, float], step: int):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()


class Reporters:
    """Every backend of ``report_to``; ``train(record)`` / ``eval(record)`` log a step to each."""

    def __init__(self, report_to: list[str], output_dir, config: dict):
        check_backends(report_to)
        makers = {"tensorboard": _TensorBoard, "wandb": _Wandb}
        self.backends = [makers[name](Path(output_dir), config) for name in dict.fromkeys(report_to)
                         if name != "none"]

    def train(self, record: dict):
        self._log({f"train/{k}": v for k, v in train_scalars(record).items()}, record["step"])

    def eval(self, record: dict):
        self._log({f"eval/{k}": v for k, v in eval_scalars(record).items()}, record["step"])

    def _log(self, scalars, step):
        for backend in self.backends:
            backend.log(scalars, step)

    def close(self):
        for backend in self.backends:
            backend.close()
