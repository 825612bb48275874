"""Shared-prefix forward for a whole micro-batch: every context once, all rollouts in one pass.

A micro-batch has B contexts (prompts, or teacher contexts) with G rollouts each, the rollouts stored
as rows ``b*G .. b*G+G-1`` of one ``[B*G, L]`` completion tensor. Two decoder calls score them all:

1. the B shared prefixes (context minus its last token), right padded into one ``[B, P]`` batch;
2. the ``[B*G, L]`` continuations (last context token, then the completion minus its last token)
   on the prefix KV cache expanded G times, with the padding slots masked out and positions
   continuing each row's own prefix.

Right padding (not left) keeps every query row attending to at least one real token, so no padded
position produces NaN (which would leak into gradients through 0 * NaN). Causal attention makes a
prefix's keys and values independent of what follows, so the hidden states, and the gradients that
flow back through the expanded cache into the single prefix pass, equal the unshared computation.
"""
from __future__ import annotations

import torch


def right_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors into ``[B, max_len]`` right padded with ``pad_id``, plus the 0/1 mask."""
    width = max(r.numel() for r in rows)
    ids = rows[0].new_full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    return ids, mask


def continuations(contexts: list[torch.Tensor], completions: torch.Tensor, completion_mask: torch.Tensor):
    """(ids, attention mask) ``[B*G, L]``: row r is ``context[-1], completion[r, :-1]``."""
    group = completions.shape[0] // len(contexts)
    last = torch.stack([c[-1] for c in contexts]).repeat_interleave(group)[:, None]
    ids = torch.cat([last, completions[:, :-1]], dim=1)
    mask = torch.cat([torch.ones_like(completion_mask[:, :1]), completion_mask[:, :-1]], dim=1).long()
    return ids, mask


def batched_prefix_hidden(decoder, contexts: list[torch.Tensor], completions: torch.Tensor,
                          completion_mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Final hidden states ``[B*G, L, H]`` predicting each completion token, each context run once.

    ``decoder`` is a Hugging Face base model (``model.get_decoder()``); ``completions`` holds G rows
    per context (``B*G`` rows in all), right padded; ``completion_mask`` marks the real tokens.
    """
    if any(c.dim() != 1 or c.numel() < 2 for c in contexts):
        raise ValueError("every context must be a 1-D tensor of at least 2 token ids")
    if completions.shape[0] % len(contexts):
        raise ValueError(f"{completions.shape[0]} completion rows do not split into {len(contexts)} groups")
    group = completions.shape[0] // len(contexts)
    prefix_ids, prefix_mask = right_pad([c[:-1] for c in contexts], pad_id)
    cont_ids, cont_mask = continuations(contexts, completions, completion_mask)
    pre = decoder(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True)
    cache = pre.past_key_values
    cache.batch_repeat_interleave(group)
    starts = prefix_mask.sum(1).repeat_interleave(group)
    positions = starts[:, None] + torch.arange(cont_ids.shape[1], device=cont_ids.device)
    mask = torch.cat([prefix_mask.repeat_interleave(group, 0), cont_mask], dim=1)
    out = decoder(input_ids=cont_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True)
    return out.last_hidden_state


def batched_unshared_hidden(decoder, contexts, completions, completion_mask, pad_id) -> torch.Tensor:
    """The same hidden states the naive way (TRL's): every row runs its whole context again."""
    group = completions.shape[0] // len(contexts)
    cont_ids, cont_mask = continuations(contexts, completions, completion_mask)
    rows, masks, lengths = [], [], []
    for r in range(completions.shape[0]):
        ctx = contexts[r // group][:-1]
        rows.append(torch.cat([ctx, cont_ids[r]]))
        masks.append(torch.cat([torch.ones_like(ctx), cont_mask[r]]))
        lengths.append(ctx.numel())
    ids, _ = right_pad(rows, pad_id)
    mask, _ = right_pad(masks, 0)
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    width = cont_ids.shape[1]
    return torch.stack([hidden[r, p: p + width] for r, p in enumerate(lengths)])


def tokens_processed(context_lengths: list[int], completion_width: int, group: int) -> tuple[int, int]:
    """(shared, unshared) token passes of one side of a micro-batch."""
    shared = sum(context_lengths) + len(context_lengths) * group * completion_width
    return shared, group * (sum(context_lengths) + len(context_lengths) * completion_width)
