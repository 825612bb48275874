"""On-policy rollouts: G sampled completions per prompt from the student, for a whole micro-batch.

``RolloutEngine`` is the seam: anything with ``generate(model, prompts, num_generations,
max_new_tokens, temperature, greedy=False) -> RolloutBatch`` can produce rollouts (a vLLM or server
engine can be plugged in through ``SDFT``'s ``engine`` argument). ``HFRolloutEngine`` is the built-in
one: every prompt of the micro-batch is prefilled once (right padded into one batch), its KV cache is
expanded to its G samples after the prefill, and all B*G rows then decode together, each stopping at
its own end-of-sequence token; the loop ends as soon as every row has finished.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .batch_prefix import as_attention_mask, right_pad, supports_tree
from .model_parts import eval_mode


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


def chat_ids(tokenizer, messages: list[dict], device, add_generation_prompt: bool = True) -> torch.Tensor:
    """Token ids [P] of chat messages, by default with the assistant turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return ids[0].to(device)


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
    return out.logits[torch.arange(ids.shape[0], device=ids.device), column], out.past_key_values


def sample(log_p: torch.Tensor) -> torch.Tensor:
    """One token per row from log-probabilities, by inverting the cumulative distribution.

    Exact categorical sampling with one uniform draw per row; ``torch.multinomial`` draws one
    exponential per vocabulary entry, which cost ~10 ms a step for 8 x 49152 on a 2-core CPU.
    """
    cdf = log_p.exp().double().cumsum(-1)
    u = torch.rand(log_p.shape[0], 1, dtype=torch.float64, device=log_p.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=log_p.shape[1] - 1)


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
        layer.update = _append_in_place.__get__(layer)


def decode_mask(prompt_mask: torch.Tensor, group: int, steps: int) -> torch.Tensor:
    """[B, 1, G, P + G*steps] bool mask of decoding step ``steps - 1``: sample g sees its prompt's real
    tokens and its own earlier tokens, which sit at slots P + t*G + g."""
    batch = prompt_mask.shape[0]
    own = torch.eye(group, dtype=torch.bool, device=prompt_mask.device).repeat(1, steps)  # [G, G*steps]
    return torch.cat([prompt_mask.bool()[:, None, :].expand(batch, group, -1),
                      own[None].expand(batch, -1, -1)], dim=2)[:, None]


class HFRolloutEngine:
    """Batched sampling with any transformers causal LM (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(self, model, prompts, num_generations, max_new_tokens, temperature, greedy=False) -> RolloutBatch:
        pad_id = self.tokenizer.pad_token_id
        stop = torch.tensor(sorted(eos_ids(model, self.tokenizer)), device=prompts[0].device)
        ids, attn = right_pad(prompts, pad_id)
        lengths = attn.sum(1)
        group = num_generations
        with eval_mode(model):
            logits, cache = _last_logits(model, ids, lengths)
            logits = logits.repeat_interleave(group, 0)
            # Each prompt's G samples decode as G query tokens of one row over the prompt's single
            # KV cache (tree-shaped mask): the prompt KV is never copied or read G times.
            tree = supports_tree(model)
            if tree:
                reserve_room(cache, group * max_new_tokens)
            else:
                cache.batch_repeat_interleave(group)
                attn = attn.repeat_interleave(group, 0)
            positions = lengths[:, None] + torch.zeros(1, group, dtype=lengths.dtype, device=ids.device)
            rows = logits.shape[0]
            done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
            tokens, logprobs, alive = [], [], []
            for t in range(max_new_tokens):
                log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
                token = log_p.argmax(-1) if greedy else sample(log_p)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                alive.append(~done)
                logprobs.append(torch.where(done, 0.0, log_p.gather(1, token[:, None]).squeeze(1)))
                tokens.append(token)
                done = done | torch.isin(token, stop)
                if bool(done.all()) or t + 1 == max_new_tokens:
                    break
                if tree:
                    mask = as_attention_mask(decode_mask(attn, group, t + 1), model)
                    out = model(input_ids=token.view(-1, group), attention_mask=mask, position_ids=positions + t,
                                past_key_values=cache, use_cache=True)
                    logits = out.logits.reshape(rows, -1)
                else:
                    attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                    out = model(input_ids=token[:, None], attention_mask=attn,
                                position_ids=positions.reshape(-1, 1) + t, past_key_values=cache, use_cache=True,
                                logits_to_keep=1)
                    logits = out.logits[:, -1]
        mask = torch.stack(alive, 1)
        width = max(int(mask.sum(1).max()), 1)
        return RolloutBatch(list(prompts), torch.stack(tokens, 1)[:, :width], mask[:, :width],
                            torch.stack(logprobs, 1)[:, :width])
