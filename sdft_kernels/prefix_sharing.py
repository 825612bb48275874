"""Shared-prefix forward passes: run a prompt once and reuse its KV cache for G continuations.

For SDFT every prompt has G sampled completions. The student sees ``prompt + completion`` and the
teacher sees ``teacher_context + completion``; the prompt (or teacher context) part is the same for
all G rollouts. Running it once and expanding its KV cache saves (G - 1) * P token passes per prompt
for each of the student and the teacher. Gradients flow back through the expanded cache into the
single prefix pass, so they equal the unshared computation (tests check this).

The last prefix token is moved into the continuation: then the continuation's hidden states at
positions 0..L-1 are exactly those that predict the L completion tokens.
"""
from __future__ import annotations

import torch


def split_for_scoring(context_ids: torch.Tensor, completions: torch.Tensor):
    """Return (shared prefix [P-1], continuations [G, L]) whose hidden states predict the completions.

    ``context_ids`` [P] is the prompt (or teacher context), ``completions`` [G, L] the sampled tokens
    (right padded). Continuation row g is ``context[-1], completion[g, :-1]``.
    """
    if context_ids.dim() != 1 or context_ids.numel() == 0:
        raise ValueError("context_ids must be a non-empty 1-D tensor of token ids")
    g = completions.shape[0]
    last = context_ids[-1:].expand(g, 1)
    return context_ids[:-1], torch.cat([last, completions[:, :-1]], dim=1)


def _continuation_mask(completion_mask: torch.Tensor) -> torch.Tensor:
    ones = torch.ones_like(completion_mask[:, :1])
    return torch.cat([ones, completion_mask[:, :-1]], dim=1)


def shared_prefix_hidden(decoder, context_ids, completions, completion_mask):
    """Final hidden states [G, L, H] predicting each completion token, with the context run once.

    ``decoder`` is a Hugging Face base model (``model.get_decoder()``): it takes input_ids,
    attention_mask, position_ids, past_key_values and use_cache and returns last_hidden_state.
    """
    prefix, cont = split_for_scoring(context_ids, completions)
    g, length = cont.shape
    p = prefix.numel()
    cont_mask = _continuation_mask(completion_mask).to(torch.long)
    positions = torch.arange(p, p + length, device=cont.device).expand(g, length)
    if p == 0:
        out = decoder(input_ids=cont, attention_mask=cont_mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state
    pre = decoder(input_ids=prefix[None], use_cache=True)
    cache = pre.past_key_values
    cache.batch_repeat_interleave(g)
    mask = torch.cat([torch.ones(g, p, dtype=torch.long, device=cont.device), cont_mask], dim=1)
    out = decoder(input_ids=cont, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True)
    return out.last_hidden_state


def unshared_hidden(decoder, context_ids, completions, completion_mask):
    """The same hidden states computed naively: G full sequences, context repeated in each."""
    prefix, cont = split_for_scoring(context_ids, completions)
    g = cont.shape[0]
    p = prefix.numel()
    ids = torch.cat([prefix.expand(g, p), cont], dim=1)
    mask = torch.cat([torch.ones(g, p, dtype=torch.long, device=cont.device),
                      _continuation_mask(completion_mask).to(torch.long)], dim=1)
    out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state[:, p:]


def tokens_processed(context_len: int, completion_len: int, rollouts: int) -> tuple[int, int]:
    """(shared, unshared) token passes for one prompt group."""
    return context_len + rollouts * completion_len, rollouts * (context_len + completion_len)
