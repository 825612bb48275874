"""``load_best_model_at_end``: the trainable weights of the run's best evaluation so far, kept on disk
(``output_dir/best_weights.pt``, with its step and value in ``best_weights.json``) so that a crash
or a resume keeps them, and put back into the model when the run ends.

Ranking: the higher ``score`` / ``retention_score``, the lower ``perplexity`` /
``retention_text_perplexity`` / ``loss``; on a tie the earlier step (less drift for the same result), whatever
order the steps are offered in (a resumed run offers again steps it had passed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdft.run.checkpoint import copy_trainable, trainable_state
from sdft.run.run_dir import BEST_FILE, BEST_RECORD, best_record, replace_file
from sdft.run.writes import WRITE_ERRORS, WriteError, write_reason

LOWER_IS_BETTER = ("perplexity", "loss")  # the ends of the names of the figures ranked lowest first (NAME_loss too)


class Ranking:
    """The best evaluation so far by ``metric`` (see the module doc): its step and value (None: none yet)."""

    def __init__(self, metric: str):
        self.metric, self.step, self.value = metric, None, None

    def better(self, step: int, value: float) -> bool:
        if value != value:  # NaN never wins
            return False
        if self.step is None:
            return True
        if value == self.value:
            return step < self.step
        return value < self.value if self.metric.endswith(LOWER_IS_BETTER) else value > self.value

    def offer(self, step: int, record: dict, model=None) -> bool:
        """Whether ``record`` (an evaluation at ``step``) beats the best so far; it becomes the best if so (after
        ``keep``)."""
        if self.metric not in record:
            raise ValueError(f"metric_for_best_model={self.metric} is not among this run's evaluation figures "
                             f"({', '.join(k for k in record if k != 'step' and not k.endswith('answers'))})")
        value = float(record[self.metric])
        if not self.better(step, value):
            return False
        self.keep(step, value, model)
        self.step, self.value = step, value
        return True

    def keep(self, step: int, value: float, model) -> None:
        """What a new best does besides ranking first (here: nothing)."""


class BestWeights(Ranking):
    """The best evaluation's weights of a run in ``output_dir`` by ``metric`` (see the module doc)."""

    def __init__(self, output_dir, metric: str, write: bool = True):
        super().__init__(metric)  # none yet (or unreadable): the next evaluation starts the ranking
        self.out, self.write = Path(output_dir), write
        record = best_record(self.out)
        if record is not None and record["metric"] == metric and (self.out / BEST_FILE).is_file():
            self.step, self.value = record["step"], record["value"]

    def keep(self, step: int, value: float, model) -> None:
        """``model``'s weights, the new best, written to disk (by the process that writes)."""
        if not self.write:
            return
        tmp = self.out / (BEST_FILE + ".tmp")
        try:
            torch.save(trainable_state(model), tmp)
        except WRITE_ERRORS as err:
            tmp.unlink(missing_ok=True)
            kept = f"the pick of step {self.step} is kept" if self.step is not None else "nothing was picked yet"
            raise WriteError(f"could not write {self.out / BEST_FILE}: {write_reason(err, self.out)}; "
                             f"{kept}") from None
        os.replace(tmp, self.out / BEST_FILE)
        replace_file(self.out / BEST_RECORD, json.dumps({"step": step, "value": value, "metric": self.metric}))

    def restore(self, model, last_step: int) -> int | None:
        """Put the best weights (read from disk: every process of a DDP run reads the same) into ``model``
        unless they are the last step's; the selected step (None: nothing was evaluated)."""
        record = best_record(self.out)
        if record is None:
            return None
        if record["step"] != last_step:
            state = torch.load(self.out / BEST_FILE, map_location="cpu", weights_only=True)
            copy_trainable(state, model, str(self.out / BEST_FILE))
        return record["step"]
