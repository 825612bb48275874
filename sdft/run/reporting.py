"""Run logging beside metrics.jsonl: TensorBoard and/or Weights & Biases (offline unless told).

Scalars use TRL's SDFT names where they mean the same (``self_distillation/distillation_loss``,
``completions/mean_length`` ...), under ``train/`` and ``eval/`` as the transformers Trainer logs
them, so dashboards built for TRL runs read ours.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
from datetime import datetime
from pathlib import Path

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}

# a step record's key -> TRL's / the transformers Trainer's name, where the figure means the same
TRL_NAMES = {
    "epoch": "epoch",
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
}
# sdft's own figures, namespaced so none is mistaken for a TRL metric of another meaning
OWN_NAMES = {
    "tokens": "sdft/tokens",  # this step's completion tokens (TRL's num_tokens counts all tokens seen)
    "tokens_per_s": "sdft/tokens_per_second",
    "tokens_processed": "sdft/tokens_processed",
    "tokens_processed_unshared": "sdft/tokens_processed_unshared",
    "peak_memory_mib": "sdft/peak_memory_mib",
    "seconds": "sdft/step_seconds",
    "rollout_seconds": "sdft/rollout_seconds",
    "loss_seconds": "sdft/loss_and_backward_seconds",
    "skipped": "sdft/skipped",
    "divergence": "sdft/divergence",
}


def logged_record(record: dict) -> dict:
    """A step's record as ``metrics.jsonl`` and the loggers name it: ``step``, TRL's names (the SDFT loss
    also as ``self_distillation/distillation_loss``, as TRL logs it), then sdft's own under ``sdft/``."""
    out = {"step": record["step"]}
    out.update({TRL_NAMES[k]: v for k, v in record.items() if k in TRL_NAMES})
    if record.get("divergence") != "sft_cross_entropy" and "loss" in record:
        out["self_distillation/distillation_loss"] = record["loss"]
    out.update({OWN_NAMES.get(k, f"sdft/{k}"): v for k, v in record.items() if k not in TRL_NAMES and k != "step"})
    return out


def check_backends(report_to: list[str]) -> None:
    """A one-line error, before any model loads, for a backend whose package is missing."""
    for name in report_to:
        if name != "none" and importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(f"report_to={name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}")


def train_scalars(record: dict) -> dict[str, float]:
    """A step's numeric figures under ``logged_record``'s names, for the loggers."""
    return {k: float(v) for k, v in logged_record(record).items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


EVAL_NAMES = {"score": "score", "perplexity": "perplexity", "loss": "loss", "retention_score": "retention/score",
              "retention_text_perplexity": "retention/text_perplexity"}


def eval_scalars(record: dict) -> dict[str, float]:
    """An evaluation's figures: the new skill's score, perplexity and held-out loss (each named set's as
    NAME/score, ...), and what the run kept (retention/...)."""
    out = {name: float(record[key]) for key, name in EVAL_NAMES.items() if key in record}
    for key, value in record.items():
        named = NAMED_FIGURE.fullmatch(key)
        if named and key not in EVAL_NAMES:
            out[f"{named[1]}/{named[2]}"] = float(value)
    return out


NAMED_FIGURE = re.compile(r"(.+)_(score|perplexity|loss)")  # a named evaluation set's figure (sdft.data.examples)


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


class _Trackio:
    """trackio's local store (``TRACKIO_DIR``), and a Space's dashboard with ``trackio_space_id``, as the HF
    Trainer's TrackioCallback logs; its project is ``project``."""

    def __init__(self, output_dir: Path, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project=config.get("project") or "sdft", name=run_name(), config=config,
                     space_id=config.get("trackio_space_id") or None)

    def log(self, scalars: dict[str, float], step: int):
        self.trackio.log(scalars, step=step)

    def close(self):
        self.trackio.finish()


class Reporters:
    """Every backend of ``report_to``; ``train(record)`` / ``eval(record)`` log a step to each."""

    def __init__(self, report_to: list[str], output_dir, config: dict):
        check_backends(report_to)
        makers = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio}
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
