"""The SDFT loss on held-out rows, as TRL's ``eval_loss``: each evaluation samples fresh rollouts of every held-out
prompt (``num_generations_eval``, else ``num_generations``, at the run's temperature), scores them with the teacher
and takes the same divergence the training step takes, without a gradient, in eval mode.

The rollouts come from a random stream of their own (seeded by the run's seed, the same at every evaluation, so
two evaluations differ by the weights alone), and the training's own stream is left as it was: a run samples the
same training rollouts whether it evaluates or not.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from sdft.run.run_dir import report_line


class HeldOutLoss:
    """``(model, examples, found) -> float``: the held-out SDFT loss, for ``Evaluator``'s ``loss``."""

    def __init__(self, run, teacher, engine, batch_loss, encode):
        self.run, self.teacher, self.engine, self.batch_loss, self.encode = run, teacher, engine, batch_loss, encode
        self._encoded: dict[int, list] = {}  # by the held-out set's identity: encoded once a run

    def encoded(self, examples) -> list:
        """The rows' token ids, once a run; a row the training limits refuse (a teacher context over
        max_prompt_length: held-out rows are only answered otherwise) is left out of the loss, and one line says
        how many."""
        if id(examples) not in self._encoded:
            run, kept, left_out = self.run, [], []
            for example in examples:
                try:
                    (e,) = self.encode([example], run.tokenizer, run.config)
                except ValueError as err:
                    left_out.append(str(err))
                    continue
                kept.append(dataclasses.replace(e, prompt_ids=e.prompt_ids.to(run.device),
                                                teacher_ids=e.teacher_ids.to(run.device)))
            if left_out and run.world.is_main:
                report_line(f"sdft: the held-out loss leaves out {len(left_out)} of {len(examples)} rows that a "
                            f"training step would refuse (the first: {left_out[0]})")
            self._encoded[id(examples)] = kept
        return self._encoded[id(examples)]

    def __call__(self, model, examples, found=None, progress=lambda rows: None) -> float:
        """``progress(rows)``: called as rows are scored (a progress bar's ``update``)."""
        config = self.run.config
        encoded = self.encoded(examples)
        progress(len(examples) - len(encoded))  # the rows left out
        devices = [self.run.device] if self.run.device.type == "cuda" else []
        if not encoded:
            return math.nan
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(config.seed)
                for start in range(0, len(encoded), config.per_device_train_batch_size):
                    chosen = encoded[start:start + config.per_device_train_batch_size]
                    sources = [e.teacher_ids if config.generate_from_teacher else e.prompt_ids for e in chosen]
                    batch = self.engine.generate(model, sources, config.num_generations_eval or config.num_generations,
                                                 config.max_completion_length, config.temperature)
                    if config.generate_from_teacher:  # sampled from the teacher context, scored from the prompt
                        batch = dataclasses.replace(batch, prompts=[e.prompt_ids for e in chosen])
                    loss = self.batch_loss(model, self.teacher, batch, [e.teacher_ids for e in chosen],
                                           self.run.tokenizer.pad_token_id)
                    total += float(loss)
                    count += self.batch_loss.normaliser(batch)
                    progress(len(chosen))
        finally:
            model.train(was_training)
        return total / max(count, 1)


def cross_entropy(model, examples, found, progress=lambda rows: None) -> float:
    """The SFT baseline's held-out loss, as TRL's SFTTrainer's eval_loss: the mean token cross-entropy of the
    demonstrations given their prompts, the log of the perplexity the evaluation measured."""
    progress(len(examples))
    return math.log(found["perplexity"])
