"""On-policy rollouts: G sampled completions per prompt from the student, for a whole micro-batch.

``RolloutEngine`` is the seam: anything with ``generate(model, prompts, num_generations,
max_new_tokens, temperature, greedy=False) -> RolloutBatch`` can produce rollouts (a vLLM or server
engine can be plugged in through ``SDFT``'s ``engine`` argument). ``HFRolloutEngine`` is the built-in
one: the micro-batch's prompts are prefilled once as a prefix tree (a system message they share is
computed once, ``sdft.prefix.tree``), every sample then decodes as one query token over its prompt's
nodes (the prompt KV is never copied per sample), each stopping at its own end-of-sequence token;
the loop ends as soon as every row has finished.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sdft.models import eval_mode, kv_cache, passing_cache
from sdft.prefix.packed import as_attention_mask, pack_for, right_pad, supports_tree, tree_forward
from sdft.prefix.tree import Decoding, PackedTrees, decoding_cost, pack_apart, pack_groups, pairs_per_token
from sdft.rollout.decode_gemm import small_batch_linears
from sdft.rollout.sampling import Sampling


@dataclass
class RolloutBatch:
    """G rollouts for each of B prompts; rows ``b*G .. b*G+G-1`` belong to prompt b."""

    prompts: list[torch.Tensor]  # B prompt id tensors [P_b]
    completions: torch.Tensor  # [B*G, L] right padded with pad_id
    mask: torch.Tensor  # [B*G, L] bool, True on scored tokens (EOS included)
    logprobs: torch.Tensor  # [B*G, L] float32 rollout-time log-probs of the sampled tokens (0 if masked)

    @property
    def group_size(self) -> int:
        return self.completions.shape[0] // len(self.prompts)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


class RolloutEngine(Protocol):
    def generate(self, model, prompts: list[torch.Tensor], num_generations: int, max_new_tokens: int,
                 temperature: float, greedy: bool = False) -> RolloutBatch: ...


def trim_completions(sequences: torch.Tensor, eos_ids: set[int], pad_id: int):
    """Mask every token after the first EOS of each row; drop all-padding columns at the end."""
    is_eos = torch.isin(sequences, torch.tensor(sorted(eos_ids), device=sequences.device))
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    width = max(int(mask.sum(1).max()) if mask.numel() else 0, 1)
    completions = torch.where(mask, sequences, torch.full_like(sequences, pad_id))[:, :width]
    return completions, mask[:, :width]


def eos_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and every EOS id of the model's generation config."""
    ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    ids.discard(None)
    return ids


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _last_logits(model, ids, lengths):
    """Prefill the right-padded prompts; logits [B, V] at each prompt's last real token, and the cache.

    No padding mask: with right padding a real token never sees a padding slot under the causal
    mask alone, so attention takes its fast causal path; decoding masks the padding slots.
    """
    keep = torch.unique(lengths - 1)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=keep)
    column = torch.searchsorted(keep, lengths - 1)
    return out.logits[torch.arange(ids.shape[0], device=ids.device), column], kv_cache(out)


def sample(log_p: torch.Tensor) -> torch.Tensor:
    """One token per row from log-probabilities, by inverting the cumulative distribution.

    Exact categorical sampling with one uniform draw per row; ``torch.multinomial`` draws one
    exponential per vocabulary entry, which cost ~10 ms a step for 8 x 49152 on a 2-core CPU.
    """
    cdf = log_p.exp().double().cumsum(-1)
    u = torch.rand(log_p.shape[0], 1, dtype=torch.float64, device=log_p.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=log_p.shape[1] - 1)  # never a 0-mass id


def _append_in_place(layer, key_states, value_states, *args, **kwargs):
    """``DynamicLayer.update`` without the concatenation: write into the reserved room."""
    end = layer.filled + key_states.shape[-2]
    layer.key_room[:, :, layer.filled:end] = key_states
    layer.value_room[:, :, layer.filled:end] = value_states
    layer.filled = end
    layer.keys, layer.values = layer.key_room[:, :, :end], layer.value_room[:, :, :end]
    return layer.keys, layer.values


def reserve_room(cache, room: int):
    """Give every layer of a ``DynamicCache`` one buffer with ``room`` more positions.

    ``DynamicCache`` grows by concatenation, which copies the whole cache at every decoding step;
    here each new token is written in place.
    """
    for layer in cache.layers:
        batch, heads, length, dim = layer.keys.shape
        for name, old in (("key_room", layer.keys), ("value_room", layer.values)):
            buf = old.new_empty(batch, heads, length + room, dim)
            buf[:, :, :length] = old
            setattr(layer, name, buf)
        layer.filled = length
        layer.keys, layer.values = layer.key_room[:, :, :length], layer.value_room[:, :, :length]
        layer.update = _append_in_place.__get__(layer)  # a reference cycle: release_room breaks it


def release_room(cache):
    """Free the reserved buffers now: the bound ``update`` makes each layer a reference cycle, which
    only Python's cycle collector would free, at some later time (hundreds of MB at 8 x G8)."""
    for layer in cache.layers:
        for name in ("update", "key_room", "value_room", "keys", "values"):
            layer.__dict__.pop(name, None)


def pack_prompts(prompts: list[list[int]], pad_id: int, pairs: float, config, group: int, steps: int,
                 device=None) -> PackedTrees:
    """The rows the prompts are prefilled in, for the prefill's attention (``pairs``,
    ``sdft.prefix.packed.pack_for``) and the decoding of ``group`` rollouts of up to ``steps`` tokens each
    that follows over the same rows (``config``: the model's, for what a decoding step's pairs cost): the
    cheapest by ``decoding_cost`` of the prefill's own packing, that packing with the decoding's cost, and a
    row per prompt."""
    groups = [(p, []) for p in prompts]
    decoding = Decoding(group, steps, pairs_per_token(config))
    layouts = [pack_groups(groups, pad_id, pairs, device), pack_groups(groups, pad_id, pairs, device, decoding),
               pack_apart(groups, pad_id, device)]
    return min(layouts, key=lambda packed: decoding_cost(packed, pairs, decoding))


def cache_positions(packed: PackedTrees, group: int, steps: int) -> int:
    """The positions the tree decoder's KV cache holds over ``packed``'s rows: each row's nodes (padded to the
    widest) and room for ``steps`` tokens of as many rollouts as the fullest row has."""
    return packed.ids.shape[0] * (packed.width + packed.fullest_row * group * steps)


class _TreeDecoder:
    """Prefill the prompts' prefix tree once (a system message shared by several prompts is one
    set of nodes, where that saves more than their rollouts then pay attending over each other's
    tokens: ``pack_prompts``), then decode every sample as one query token of its prompt's row.

    Sample ``k = b*G + g`` is query slot ``q`` of row ``r`` (the row holding prompt b's tree). It
    sees its prompt's nodes (the prefill mask's row of the prompt's last node) and its own earlier
    tokens, which sit at slots ``T + t*Q + q`` of the row's cache; padding slots see only themselves.
    """

    def __init__(self, model, prompts, group: int, max_new_tokens: int, pad_id: int, attention: str = "auto"):
        self.model, self.pad_id = model, pad_id
        device = prompts[0].device
        packed, _ = pack_for(model, attention, lambda pairs: (
            pack_prompts([p.tolist() for p in prompts], pad_id, pairs, model.config, group, max_new_tokens, device),
            None))
        last = torch.stack([nodes[-1] for nodes in packed.sequence_nodes])
        row = torch.tensor(packed.sequence_row, device=device)
        keep = torch.unique(last)
        out = tree_forward(model, packed, attention, use_cache=True, logits_to_keep=keep)
        self.first_logits = out.logits[row, torch.searchsorted(keep, last)].repeat_interleave(group, 0)
        self.cache = kv_cache(out)
        rows, width = packed.ids.shape
        self.slot_row = row.repeat_interleave(group)
        per_row = torch.bincount(self.slot_row, minlength=rows)
        first_in_row = torch.cumsum(per_row, 0) - per_row
        order = torch.argsort(self.slot_row, stable=True)
        self.slot_q = torch.empty_like(order)
        self.slot_q[order] = torch.arange(order.numel(), device=device) - first_in_row[self.slot_row[order]]
        self.queries = int(per_row.max())
        reserve_room(self.cache, self.queries * max_new_tokens)
        slots = torch.arange(width, device=device)
        prompt_vis = (slots <= last[:, None]) & (last[:, None] < packed.ends[row])  # [B, T]: the prompt's nodes
        self.prefix_mask = torch.zeros(rows, self.queries, width, dtype=torch.bool, device=device)
        self.prefix_mask[self.slot_row, self.slot_q] = prompt_vis.repeat_interleave(group, 0)
        self.positions = torch.zeros(rows, self.queries, dtype=torch.long, device=device)
        self.positions[self.slot_row, self.slot_q] = packed.positions[row, last].repeat_interleave(group) + 1

    def close(self):
        release_room(self.cache)
        self.cache = None

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed decoding step t's tokens [B*G]; logits [B*G, V] for the next one."""
        rows, queries = self.prefix_mask.shape[:2]
        ids = torch.full((rows, queries), self.pad_id, dtype=tokens.dtype, device=tokens.device)
        ids[self.slot_row, self.slot_q] = tokens
        own = torch.eye(queries, dtype=torch.bool, device=tokens.device).repeat(1, t + 1)
        mask = torch.cat([self.prefix_mask, own[None].expand(rows, -1, -1)], dim=2)[:, None]
        out = self.model(input_ids=ids, attention_mask=as_attention_mask(mask, self.model),
                         position_ids=self.positions + t, use_cache=True,
                         **passing_cache(self.model, self.cache))
        return out.logits[self.slot_row, self.slot_q]


class _ReplicatedDecoder:
    """Fallback for attention without custom masks: right-padded prefill, cache copied G times."""

    def __init__(self, model, prompts, group: int, pad_id: int):
        self.model = model
        ids, self.attn = right_pad(prompts, pad_id)
        lengths = self.attn.sum(1)
        logits, self.cache = _last_logits(model, ids, lengths)
        self.first_logits = logits.repeat_interleave(group, 0)
        self.cache.batch_repeat_interleave(group)
        self.attn = self.attn.repeat_interleave(group, 0)
        self.positions = lengths.repeat_interleave(group)[:, None]

    def close(self):
        self.cache = None

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attn, position_ids=self.positions + t,
                         use_cache=True, logits_to_keep=1, **passing_cache(self.model, self.cache))
        return out.logits[:, -1]


class HFRolloutEngine:
    """Batched sampling with any transformers causal LM (see the module docstring)."""

    def __init__(self, tokenizer, decode_gemm: str = "rule", tree_attention: str = "auto",
                 sampling: Sampling = Sampling()):
        self.tokenizer = tokenizer
        self.sampling = sampling  # repetition penalty, top-k / top-p / min-p filtering (off: the model's own)
        self.decode_gemm = decode_gemm  # sdft.rollout.decode_gemm's policy: rule (seed-exact) | auto (timed) | off
        self.tree_attention = tree_attention  # the prefill's attention: sdft.prefix.attention's mode

    @torch.no_grad()
    def generate(self, model, prompts, num_generations, max_new_tokens, temperature, greedy=False) -> RolloutBatch:
        pad_id = self.tokenizer.pad_token_id
        stop = torch.tensor(sorted(eos_ids(model, self.tokenizer)), device=prompts[0].device)
        with eval_mode(model):
            if supports_tree(model):
                decoder = _TreeDecoder(model, prompts, num_generations, max_new_tokens, pad_id,
                                       self.tree_attention)
            else:
                decoder = _ReplicatedDecoder(model, prompts, num_generations, pad_id)
            try:
                with small_batch_linears(model, self.decode_gemm):
                    tokens, logprobs, alive = _decode(decoder, stop, pad_id, max_new_tokens, temperature, greedy,
                                                     self.sampling, prompts, num_generations)
            finally:
                decoder.close()
        mask = torch.stack(alive, 1)
        width = max(int(mask.sum(1).max()), 1)
        return RolloutBatch(list(prompts), torch.stack(tokens, 1)[:, :width], mask[:, :width],
                            torch.stack(logprobs, 1)[:, :width])


def _seen(prompts, group: int, vocab: int, device) -> torch.Tensor:
    """[B*G, V] bool: the tokens each row's prompt holds (row b*G+g samples from prompt b)."""
    seen = torch.zeros(len(prompts) * group, vocab, dtype=torch.bool, device=device)
    for b, prompt in enumerate(prompts):
        seen[b * group:(b + 1) * group, prompt.clamp(max=vocab - 1)] = True
    return seen


def _decode(decoder, stop, pad_id: int, max_new_tokens: int, temperature: float, greedy: bool,
            sampling: Sampling = Sampling(), prompts=(), group: int = 1):
    """Sample (or pick greedily) token by token until every row has stopped: per step the tokens, their
    log-probabilities under the model's whole tempered distribution (0 once a row is done; ``sampling``
    only shapes what is drawn: a repetition penalty over each row's ``prompts`` and tokens so far, then its
    filters) and which rows were still running."""
    logits = decoder.first_logits
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    seen = _seen(prompts, group, logits.shape[-1], logits.device) if sampling.penalizes else None
    tokens, logprobs, alive = [], [], []
    for t in range(max_new_tokens):
        scores = logits.float()
        log_p = torch.log_softmax(scores / temperature, dim=-1)
        drawn = log_p if seen is None else torch.log_softmax(sampling.penalize(scores, seen) / temperature, dim=-1)
        token = (drawn.argmax(-1) if greedy else
                 sample(sampling.restrict(drawn) if sampling.filters else drawn))
        token = torch.where(done, torch.full_like(token, pad_id), token)
        if seen is not None:
            seen[~done, token[~done]] = True
        alive.append(~done)
        logprobs.append(torch.where(done, 0.0, log_p.gather(1, token[:, None]).squeeze(1)))
        tokens.append(token)
        done = done | torch.isin(token, stop)
        if bool(done.all()) or t + 1 == max_new_tokens:
            break
        logits = decoder.step(token, t)
    return tokens, logprobs, alive
