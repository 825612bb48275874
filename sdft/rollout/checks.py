"""The rollout-engine seam's contract, checked: another engine (vLLM, a server) plugged into
``sdft.train(..., engine=...)`` fails with one line naming what is off, before any work or before
its rollouts are scored, instead of a shape error (or a silently wrong loss) deep in a step."""
from __future__ import annotations

import torch

from sdft.rollout.engine import RolloutBatch


def check_engine(engine) -> None:
    """Refuse, before any work, an engine without the ``RolloutEngine.generate`` method."""
    if not callable(getattr(engine, "generate", None)):
        raise TypeError(f"engine: {type(engine).__name__} has no generate(model, prompts, num_generations, "
                        "max_new_tokens, temperature) method (see sdft.rollout.engine.RolloutEngine)")


def check_rollouts(batch, prompts: int, group: int, max_new_tokens: int, vocab: int) -> RolloutBatch:
    """A plugged-in engine's answer, checked against the seam's contract before it is scored.

    One line naming what is off, instead of a shape error (or a silently wrong loss) deep in scoring.
    """
    if not isinstance(batch, RolloutBatch):
        raise TypeError(f"rollout engine returned {type(batch).__name__}, not a RolloutBatch")
    fields = {"completions": batch.completions, "mask": batch.mask, "logprobs": batch.logprobs}
    not_tensors = [name for name, value in fields.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"rollout engine returned a RolloutBatch whose {', '.join(not_tensors)} are not tensors")
    ids = batch.completions
    rows, width = ids.shape if ids.dim() == 2 else (None, None)
    integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
    in_vocab = not integer or ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab)
    problems = [
        (len(batch.prompts) != prompts, f"{len(batch.prompts)} prompts for {prompts} asked"),
        (rows != prompts * group, f"completions of shape {tuple(ids.shape)}, expected "
                                  f"[{prompts * group}, <= {max_new_tokens}] ({prompts} prompts x {group})"),
        (width is not None and width > max_new_tokens, f"{width} tokens a row, above max {max_new_tokens}"),
        (batch.mask.dtype != torch.bool or batch.mask.shape != ids.shape,
         "mask must be a bool tensor shaped like completions"),
        (batch.logprobs.shape != ids.shape, "logprobs must be shaped like completions"),
        (not integer, f"completions must hold integer token ids, got {ids.dtype}"),
        (not in_vocab, f"token ids outside the vocabulary [0, {vocab})"),
    ]
    bad = [text for failed, text in problems if failed]
    if bad:
        raise ValueError("rollout engine returned " + "; ".join(bad))
    return batch
