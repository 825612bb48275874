"""Skill accuracy: greedy answers to held-out prompts, scored against their demonstrations."""
from __future__ import annotations

import torch

from .data import load_examples
from .model_parts import eval_mode
from .rollouts import chat_ids, trim_completions


@torch.no_grad()
def generate_answers(model, tokenizer, examples, max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy answers, batched with left padding."""
    device = next(model.parameters()).device
    answers = []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = [chat_ids(tokenizer, ex.messages(), device) for ex in examples[start:start + batch_size]]
            width = max(ids.numel() for ids in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, device=device)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(chunk):
                ids[i, width - row.numel():] = row
                mask[i, width - row.numel():] = 1
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            completions, keep = trim_completions(out[:, width:], {tokenizer.eos_token_id}, tokenizer.pad_token_id)
            for row, m in zip(completions, keep):
                answers.append(tokenizer.decode(row[m], skip_special_tokens=True))
    return answers


def skill_accuracy(model, tokenizer, dataset=None, scorer=None, max_new_tokens: int = 48) -> dict:
    """Mean of each score over the examples; defaults to the bundled tool-call skill's eval split."""
    from .skill import load_skill, score

    examples = load_examples(load_skill("eval") if dataset is None else dataset)
    scorer = scorer or score
    answers = generate_answers(model, tokenizer, examples, max_new_tokens)
    scores = [scorer(a, ex.demonstration) for a, ex in zip(answers, examples)]
    result = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
    result["examples"] = len(scores)
    result["sample_answer"] = answers[0]
    return result
