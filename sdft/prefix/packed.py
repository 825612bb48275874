"""Shared-prefix forward for a whole micro-batch: every context once, all rollouts together.

A micro-batch has B contexts (prompts, or teacher contexts) with G rollouts each, the rollouts stored
as rows ``b*G .. b*G+G-1`` of one ``[B*G, L]`` completion tensor.

``tree_hidden`` (the default) runs ONE decoder call over the micro-batch's prefix tree
(``sdft.prefix.tree``): every distinct prefix (a system message shared by several prompts, a
prompt shared by its G rollouts, rollouts that sampled the same first tokens) is one node, packed in
depth-first order with a tree-shaped attention mask and its depth as position. Nothing is copied
per rollout, and each weight sees one matmul per micro-batch. Groups that share too little to pay
for the extra attention pairs go to separate rows. It needs an attention implementation that takes
a custom 4-D mask (``sdpa`` or ``eager``).

``batched_prefix_hidden`` (any attention implementation) runs two decoder calls:

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

import warnings

import torch

from sdft.models.parts import kv_cache, passing_cache
from sdft.prefix import attention as tree_attention
from sdft.prefix.tree import PackedTrees, pack_groups, pairs_per_token


def right_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors into ``[B, max_len]`` right padded with ``pad_id``, plus the 0/1 mask."""
    width = max(r.numel() for r in rows)
    ids = rows[0].new_full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    return ids, mask


def group_size(contexts: list[torch.Tensor], completions: torch.Tensor) -> int:
    """G, after checking that every context has a token and the rows split into groups."""
    if any(c.dim() != 1 or c.numel() < 1 for c in contexts):
        raise ValueError("every context must be a 1-D tensor of at least 1 token id")
    if completions.shape[0] % len(contexts):
        raise ValueError(f"{completions.shape[0]} completion rows do not split into {len(contexts)} groups")
    return completions.shape[0] // len(contexts)


def continuations(contexts: list[torch.Tensor], completions: torch.Tensor, completion_mask: torch.Tensor):
    """(ids, attention mask) ``[B*G, L]``: row r is ``context[-1], completion[r, :-1]``."""
    group = completions.shape[0] // len(contexts)
    last = torch.stack([c[-1] for c in contexts]).repeat_interleave(group)[:, None]
    ids = torch.cat([last, completions[:, :-1]], dim=1)
    mask = torch.cat([torch.ones_like(completion_mask[:, :1]), completion_mask[:, :-1]], dim=1).long()
    return ids, mask


def batched_prefix_hidden(decoder, contexts: list[torch.Tensor], completions: torch.Tensor,
                          completion_mask: torch.Tensor, pad_id: int, passes: list | None = None) -> torch.Tensor:
    """Final hidden states ``[B*G, L, H]`` predicting each completion token, each context run once.

    ``decoder`` is a Hugging Face base model (``model.get_decoder()``); ``completions`` holds G rows
    per context (``B*G`` rows in all), right padded; ``completion_mask`` marks the real tokens.
    """
    group = group_size(contexts, completions)
    if getattr(decoder, "gradient_checkpointing", False) and decoder.training:  # no KV cache there
        _warn_no_cache(decoder)
        return batched_unshared_hidden(decoder, contexts, completions, completion_mask, pad_id, passes)
    if min(c.numel() for c in contexts) < 2:  # a one-token prompt (TRL's plain text "hi"): no prefix to cache
        return batched_unshared_hidden(decoder, contexts, completions, completion_mask, pad_id, passes)
    prefix_ids, prefix_mask = right_pad([c[:-1] for c in contexts], pad_id)
    cont_ids, cont_mask = continuations(contexts, completions, completion_mask)
    pre = decoder(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True)
    cache = kv_cache(pre)
    if cache is None:  # transformers turns the cache off under gradient checkpointing in training
        _warn_no_cache(decoder)
        return batched_unshared_hidden(decoder, contexts, completions, completion_mask, pad_id, passes)
    cache.batch_repeat_interleave(group)
    starts = prefix_mask.sum(1).repeat_interleave(group)
    positions = starts[:, None] + torch.arange(cont_ids.shape[1], device=cont_ids.device)
    mask = torch.cat([prefix_mask.repeat_interleave(group, 0), cont_mask], dim=1)
    out = decoder(input_ids=cont_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  **passing_cache(decoder, cache))
    _count(passes, int(prefix_mask.sum()) + cont_ids.numel())
    return out.last_hidden_state


def _warn_no_cache(decoder) -> None:
    if not getattr(decoder, "_sdft_warned_no_cache", False):
        decoder._sdft_warned_no_cache = True
        warnings.warn(f"{decoder.config._attn_implementation} attention takes no tree mask and gradient "
                      "checkpointing turns the KV cache off, so prompts are not shared in this pass (each "
                      "rollout runs its prompt again); use sdpa/eager attention to share them", stacklevel=3)


def _count(passes: list | None, tokens: int) -> None:
    """Record the token passes a scoring pass cost (for the ``tokens_processed`` metric)."""
    if passes is not None:
        passes.append(tokens)


def supports_tree(model) -> bool:
    """Whether ``model``'s attention takes a custom 4-D mask (what the tree-shaped passes need)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


def as_attention_mask(visible: torch.Tensor, model) -> torch.Tensor:
    """A custom 4-D bool mask as ``model``'s attention wants it: bool for sdpa, additive for eager."""
    if model.config._attn_implementation != "eager":
        return visible
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible,
                                                                                       torch.finfo(dtype).min)


def pack_rollouts(contexts: list[torch.Tensor], completions: torch.Tensor, completion_mask: torch.Tensor,
                  pad_id: int, pairs: float) -> tuple[PackedTrees, torch.Tensor]:
    """The micro-batch's prefix tree, and the flat node index ``[B*G, L]`` predicting each completion token.

    Sequence r is its context followed by completion r minus its last real token; slot t of row r is
    read at sequence position ``len(context) - 1 + t`` (masked slots: the row's last real node).
    """
    packed, (index,) = pack_sides([contexts], completions, completion_mask, pad_id, pairs)
    return packed, index


def pack_sides(sides: list[list[torch.Tensor]], completions: torch.Tensor, completion_mask: torch.Tensor,
               pad_id: int, pairs: float) -> tuple[PackedTrees, list[torch.Tensor]]:
    """One prefix tree over several sides' contexts (e.g. student prompts and teacher contexts) followed
    by the same completions; a node index ``[B*G, L]`` per side (see ``pack_rollouts``)."""
    group = group_size(sides[0], completions)
    lengths = completion_mask.sum(1).tolist()
    rows = completions.tolist()
    conts = [[rows[r][:max(lengths[r] - 1, 0)] for r in range(b * group, (b + 1) * group)]
             for b in range(len(sides[0]))]
    groups = [(ctx.tolist(), conts[b]) for contexts in sides for b, ctx in enumerate(contexts)]
    packed = pack_groups(groups, pad_id, pairs, completions.device)
    width = completions.shape[1]
    steps = torch.arange(width, device=completions.device)
    indices = []
    for k, contexts in enumerate(sides):
        index = []
        for r in range(completions.shape[0]):
            seq = k * completions.shape[0] + r
            nodes = packed.sequence_nodes[seq]
            start = contexts[r // group].numel() - 1
            index.append(packed.flat_index(seq, nodes[(start + steps).clamp(max=nodes.numel() - 1)]))
        indices.append(torch.stack(index))
    return packed, indices


def tree_forward(decoder, packed: PackedTrees, attention: str = "auto", **kwargs):
    """One decoder call over packed prefix trees (tree-shaped mask, depth as position): the block mask
    through FlexAttention where ``tree_attention.use_flex`` says so, else the dense 4-D mask."""
    if tree_attention.use_flex(attention, packed.width, decoder):
        with tree_attention.flex_attention_of(decoder):
            return decoder(input_ids=packed.ids, attention_mask=tree_attention.block_mask(packed.ends),
                           position_ids=packed.positions, **kwargs)
    mask = as_attention_mask(packed.visible(), decoder)
    return decoder(input_ids=packed.ids, attention_mask=mask, position_ids=packed.positions, **kwargs)


def pack_for(decoder, attention: str, pack):
    """``pack(pairs)`` (packed trees and their node indices) under the cost model of the attention the
    pass will take (``pack_choosing``, with ``decoder``'s rule)."""
    return pack_choosing(pack, *tree_attention.flex_rule_now(attention, decoder), decoder.config)[0]


def pack_choosing(pack, may_flex: bool, takes_flex, model_config):
    """(``pack(pairs)``, whether the pass takes the block mask): a block-sparse pass costs its nodes (only
    visible blocks are computed), so everything shares one tree where the pass ``may_flex`` and
    ``takes_flex(width)`` of that tree; a dense pass also pays every node pair (``pairs_per_token``), so
    weakly sharing groups go to separate rows. The run and the dry run's plan both choose here."""
    if may_flex:
        packed = pack(float("inf"))
        if takes_flex(packed[0].width):
            return packed, True
    return pack(pairs_per_token(model_config)), False


def tree_hidden(decoder, contexts: list[torch.Tensor], completions: torch.Tensor,
                completion_mask: torch.Tensor, pad_id: int, passes: list | None = None,
                attention: str = "auto") -> torch.Tensor:
    """Final hidden states ``[B*G, L, H]`` predicting each completion token, one packed pass over
    the micro-batch's prefix tree (``sdft.prefix.tree``): every distinct prefix once.

    Same contract as ``batched_prefix_hidden``; the decoder must use ``sdpa`` or ``eager`` attention.
    ``attention``: ``tree_attention``'s mode (dense mask or FlexAttention block mask).
    """
    packed, index = pack_for(decoder, attention,
                             lambda pairs: pack_rollouts(contexts, completions, completion_mask, pad_id, pairs))
    hidden = tree_forward(decoder, packed, attention, use_cache=False).last_hidden_state
    _count(passes, packed.num_nodes)
    return hidden.reshape(-1, hidden.shape[-1])[index]


def joint_tree_hidden(decoder, prompts, teacher_contexts, completions, completion_mask, pad_id,
                      passes: list | None = None, attention: str = "auto"):
    """(student hidden, detached teacher hidden) from ONE pass over a tree holding both sides: for a live
    teacher (the student's own weights) the prefix a teacher context shares with its prompt (system
    message, question) is computed once. The teacher's rows are detached, so no gradient flows through
    its branches; gradients through shared nodes come from the student branches only, as unshared."""
    packed, (s_index, t_index) = pack_for(decoder, attention, lambda pairs: pack_sides(
        [prompts, teacher_contexts], completions, completion_mask, pad_id, pairs))
    hidden = tree_forward(decoder, packed, attention, use_cache=False).last_hidden_state
    _count(passes, packed.num_nodes)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat[s_index], flat[t_index].detach()


def joint_pass_pays(decoder, prompts, teacher_contexts, completions, completion_mask, pad_id,
                    attention: str = "auto") -> bool:
    """Whether one joint pass is cheaper than a student pass plus a teacher pass.

    A node costs about 3 token passes with backward and 1 without. Separately: 3 S + T; jointly 3 J
    (teacher-only nodes sit in the same tensors as the student's, so they run backward too, on a zero
    gradient), with S, T, J the node counts of the student tree, the teacher tree and the joint tree.
    Long shared system messages pay; short prompts with long demonstrations do not."""
    def pack(sides):
        return pack_for(decoder, attention, lambda pairs: pack_sides(sides, completions, completion_mask, pad_id,
                                                                     pairs))[0]

    return joint_nodes_pay(pack, prompts, teacher_contexts)


def joint_nodes_pay(pack, prompts, teacher_contexts) -> bool:
    """``joint_pass_pays``'s rule over ``pack(sides)`` (the packed trees of a list of sides)."""
    count = [pack(sides).num_nodes for sides in ([prompts], [teacher_contexts], [prompts, teacher_contexts])]
    return 3 * count[2] < 3 * count[0] + count[1]


def shared_prefix_hidden(decoder, contexts, completions, completion_mask, pad_id,
                         passes: list | None = None, attention: str = "auto") -> torch.Tensor:
    """The packed tree pass where the attention implementation allows it, else the KV-cache pass."""
    if supports_tree(decoder):
        return tree_hidden(decoder, contexts, completions, completion_mask, pad_id, passes, attention)
    return batched_prefix_hidden(decoder, contexts, completions, completion_mask, pad_id, passes)


def context_hidden(decoder, contexts, completions, completion_mask, pad_id, passes: list | None,
                   share_prefix: bool, attention: str = "auto") -> torch.Tensor:
    """The scoring pass of one side: shared prefixes (``shared_prefix_hidden``) or every row in full."""
    if share_prefix:
        return shared_prefix_hidden(decoder, contexts, completions, completion_mask, pad_id, passes, attention)
    return batched_unshared_hidden(decoder, contexts, completions, completion_mask, pad_id, passes)


def batched_unshared_hidden(decoder, contexts, completions, completion_mask, pad_id,
                            passes: list | None = None) -> torch.Tensor:
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
    _count(passes, int(mask.sum()))
    width = cont_ids.shape[1]
    return torch.stack([hidden[r, p: p + width] for r, p in enumerate(lengths)])


def tokens_processed(context_lengths: list[int], completion_width: int, group: int) -> tuple[int, int]:
    """(shared, unshared) token passes of one side of a micro-batch."""
    shared = sum(context_lengths) + len(context_lengths) * group * completion_width
    return shared, group * (sum(context_lengths) + len(context_lengths) * completion_width)
