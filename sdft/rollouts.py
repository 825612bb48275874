"""On-policy rollouts: G sampled completions per prompt from the student, cut at end-of-sequence."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_parts import eval_mode


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # [P]
    completions: torch.Tensor  # [G, L], right padded with pad_id
    mask: torch.Tensor  # [G, L] bool, True on scored tokens (EOS included)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def chat_ids(tokenizer, messages: list[dict], device, add_generation_prompt: bool = True) -> torch.Tensor:
    """Token ids [P] of chat messages, by default with the assistant turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return ids[0].to(device)


def trim_completions(sequences: torch.Tensor, eos_ids: set[int], pad_id: int):
    """Mask every token after the first EOS of each row; drop all-padding columns at the end."""
    is_eos = torch.zeros_like(sequences, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= sequences == eos
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    width = int(mask.sum(1).max()) if mask.numel() else 0
    width = max(width, 1)
    completions = torch.where(mask, sequences, torch.full_like(sequences, pad_id))[:, :width]
    return completions, mask[:, :width]


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompt_ids, num_generations, max_new_tokens, temperature) -> Rollouts:
    """Sample ``num_generations`` completions of one prompt from ``model``."""
    inputs = prompt_ids[None].expand(num_generations, -1)
    with eval_mode(model):
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    eos.discard(None)
    completions, mask = trim_completions(out[:, prompt_ids.numel():], eos, tokenizer.pad_token_id)
    return Rollouts(prompt_ids, completions, mask)


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
