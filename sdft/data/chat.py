"""Token ids of chats: a prompt with the assistant turn opened, or a prompt plus its demonstration."""
from __future__ import annotations

import torch


def chat_ids(tokenizer, messages: list[dict], device, add_generation_prompt: bool = True) -> torch.Tensor:
    """Token ids [P] of chat messages, by default with the assistant turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return ids[0].to(device)


def demonstration_ids(tokenizer, example, device, max_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(ids [P+D], number of prompt tokens P): the chat with the demonstration as the assistant turn."""
    prompt = chat_ids(tokenizer, example.messages(), device)
    full = chat_ids(tokenizer, example.messages() + [{"role": "assistant", "content": example.demonstration}],
                    device, add_generation_prompt=False)
    if full.numel() <= prompt.numel() or not torch.equal(full[: prompt.numel()], prompt):
        raise ValueError("the chat template does not extend the prompt with the assistant turn; "
                         "scoring a demonstration needs the prompt tokens to be a prefix of the full chat")
    if max_tokens is not None and full.numel() > max_tokens:
        raise ValueError(f"an example with its demonstration has {full.numel()} tokens, over max_prompt_length + "
                         f"max_completion_length = {max_tokens}")
    return full, prompt.numel()
