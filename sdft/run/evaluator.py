"""The evaluations of a run on the user's held-out data and the retention probe, kept in
``output_dir/eval.json``."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from sdft.data.examples import eval_sets
from sdft.eval import retention
from sdft.eval.evaluation import evaluate
from sdft.run.run_dir import EVAL_FILE, replace_file


class Evaluator:
    """Evaluation on the user's held-out data during a run, kept in ``output_dir/eval.json``.

    Each record: {"step", "score", "perplexity", "examples", "answers", "loss"} ("loss": the held-out loss of
    the run's own objective, as TRL's eval_loss: SDFT's divergence, ``sdft.run.held_out``, or SFT's token
    cross-entropy; not under FSDP2); step 0 is before training. Several
    named sets (``eval_dataset={name: rows}``) give each of these but "step" once per set, as NAME_score, ....
    A resumed run keeps the records up to its checkpoint's step.
    """

    FILE = EVAL_FILE

    def __init__(self, examples, scorer, max_new_tokens: int, output_dir, write: bool = True, retention=None,
                 loss=None, progress: bool = False):
        self.examples, self.scorer, self.max_new_tokens = examples, scorer, max_new_tokens
        self.loss = loss  # (model, examples, found, progress=) -> the held-out loss (TRL's eval_loss); None: none
        self.retention = retention  # sdft.eval.retention.Retention: scored beside the new skill (None: not)
        self.write = write  # False on the other processes of a sharded run: they only help generate
        self.progress = progress  # a bar of the rows each evaluation answers and scores (they can take minutes)
        self.path = Path(output_dir) / self.FILE
        self.records = self._read()

    def _read(self) -> list[dict]:
        try:
            records = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return []
        return records if isinstance(records, list) else []

    def truncate(self, step: int):
        self.records = [r for r in self.records if r.get("step", 0) <= step]

    def __call__(self, model, tokenizer, step: int) -> dict:
        record, sets = {"step": step}, eval_sets(self.examples)
        kept = len(self.retention.examples or ()) if self.retention is not None else 0
        held_out = sum(map(len, sets.values())) * (2 if self.loss is not None else 1)  # answered, then the loss
        with tqdm(total=held_out + kept, desc=f"evaluation at step {step}", unit="row", leave=False,
                  disable=not self.progress) as bar:
            for name, examples in sets.items():
                found = evaluate(model, tokenizer, examples, self.scorer, self.max_new_tokens, progress=bar.update)
                if self.loss is not None:
                    found["loss"] = self.loss(model, examples, found, progress=bar.update)
                record.update({f"{name}_{k}" if name else k: v for k, v in found.items()})
            if self.retention is not None:
                record.update(retention.score(model, tokenizer, self.retention, progress=bar.update))
        self.records = [r for r in self.records if r["step"] != step] + [record]
        if not self.write:
            return record
        replace_file(self.path, json.dumps(self.records, indent=1))
        return record
