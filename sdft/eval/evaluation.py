"""Evaluation: greedy answers to held-out prompts scored against their demonstrations, and the
perplexity of those demonstrations (``sdft.run.evaluator`` runs it during training)."""
from __future__ import annotations

import math

import torch

from sdft.data.chat import chat_ids, checked_template_kwargs, with_template_kwargs
from sdft.data.examples import load_examples
from sdft.data.sources import HELD_OUT_SPLIT
from sdft.models import eval_mode
from sdft.models.positions import check_room, position_limit
from sdft.rollout.engine import trim_completions
from sdft.rollout.sampling import Sampling


def prompt_ids(model, tokenizer, examples, max_new_tokens: int) -> list[torch.Tensor]:
    """Each row's prompt ids on the model's device, for an answer of up to ``max_new_tokens``: a chat the
    template refuses, or a prompt and answer that would go past the model's positions, is one line naming
    the row before anything is answered."""
    device, limit = next(model.parameters()).device, position_limit(model)
    prompts = []
    for i, ex in enumerate(examples):
        where = ex.where or f"row {i}"
        ids = chat_ids(tokenizer, ex.messages(), device, where=where)
        check_room(ids.numel() + max_new_tokens - 1, limit, where,  # an answer's last token is never fed
                   f"the prompt and an answer of up to {max_new_tokens} tokens",
                   "allow fewer new tokens (eval_max_new_tokens, --max-new-tokens) or shorten the prompt")
        prompts.append(ids)
    return prompts


@torch.no_grad()
def generate_answers(model, tokenizer, examples, max_new_tokens: int = 48, batch_size: int = 16,
                     progress=None) -> list[str]:
    """Greedy answers, batched with left padding; ``progress(n)`` is called with each batch's size."""
    device = next(model.parameters()).device
    prompts, answers = prompt_ids(model, tokenizer, examples, max_new_tokens), []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = prompts[start:start + batch_size]
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
            if progress is not None:
                progress(len(chunk))
    return answers


@torch.no_grad()
def sample_answers(model, tokenizer, examples, max_new_tokens: int, temperature: float,
                   sampling: Sampling = Sampling()) -> list[str]:
    """One sampled answer per prompt, through the batched rollout engine (``sampling``: its top-k / top-p)."""
    from sdft.rollout.engine import HFRolloutEngine, eos_ids

    prompts = prompt_ids(model, tokenizer, examples, max_new_tokens)
    batch = HFRolloutEngine(tokenizer, sampling=sampling).generate(model, prompts, 1, max_new_tokens, temperature)
    stop = eos_ids(model, tokenizer)
    return [tokenizer.decode([t for t in row[m].tolist() if t not in stop], skip_special_tokens=True)
            for row, m in zip(batch.completions, batch.mask)]


def skill_accuracy(model, tokenizer, dataset=None, scorer=None, max_new_tokens: int = 48) -> dict:
    """Mean of each score over the examples; defaults to the bundled tool-call skill's eval split."""
    from sdft.data.skill import load_skill, score

    examples = load_examples(load_skill("eval") if dataset is None else dataset, split=HELD_OUT_SPLIT)
    scorer = scorer or score
    answers = generate_answers(model, tokenizer, examples, max_new_tokens)
    scores = [scorer(a, ex.demonstration) for a, ex in zip(answers, examples)]
    result = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
    result["examples"] = len(scores)
    result["sample_answer"] = answers[0]
    return result


@torch.no_grad()
def demonstration_perplexity(model, tokenizer, examples) -> float:
    """exp(mean negative log-likelihood of the demonstration tokens given their prompts)."""
    from sdft.data.chat import demonstration_ids

    device = next(model.parameters()).device
    nll, count, limit = 0.0, 0, position_limit(model)
    with eval_mode(model):
        for i, ex in enumerate(examples):
            ids, p = demonstration_ids(tokenizer, ex, device)
            check_room(ids.numel(), limit, ex.where or f"row {i}", "the prompt with its demonstration",
                       "shorten the row")
            logits = model(input_ids=ids[None], logits_to_keep=ids.numel() - p + 1).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[p:], reduction="sum"))
            count += ids.numel() - p
    return math.exp(nll / max(count, 1))


def evaluate(model, tokenizer, dataset, scorer="exact", max_new_tokens: int = 48,
             chat_template_kwargs: dict | None = None, progress=None) -> dict:
    """Greedy answers to ``dataset``'s prompts scored against their demonstrations (``sdft.eval.scorers``),
    and the perplexity of the demonstrations: {"score", "perplexity", "examples", "answers"}.
    ``chat_template_kwargs``: template variables the chats render with (as a run's config takes them);
    ``progress(n)``: called as answers are made (a progress bar's ``update``)."""
    from sdft.eval.scorers import get_scorer

    if chat_template_kwargs is not None:
        tokenizer = with_template_kwargs(tokenizer, checked_template_kwargs("chat_template_kwargs",
                                                                            chat_template_kwargs))
    examples = load_examples(dataset, split=HELD_OUT_SPLIT)
    score = get_scorer(scorer)
    answers = generate_answers(model, tokenizer, examples, max_new_tokens, progress=progress)
    scores = [float(score(a, ex.demonstration)) for a, ex in zip(answers, examples)]
    return {"score": sum(scores) / len(scores), "perplexity": demonstration_perplexity(model, tokenizer, examples),
            "examples": len(examples), "answers": answers}


def shorten(text, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def eval_table(records: list[dict], examples, samples: int = 3, width: int = 60) -> str:
    """A small text table: score, perplexity and the held-out loss per evaluation, then a few answers first vs
    last."""
    columns = [("score", "score", "7.3f"), ("perplexity", "perplexity", "10.3f"), ("loss", "loss", "10.4g"),
               ("retention_score", "kept", "7.3f"), ("retention_text_perplexity", "text_ppl", "9.3f")]
    columns = [c for c in columns if records and c[0] in records[0]]
    lines = [f"{'step':>6}" + "".join(f"  {name:>{fmt.split('.')[0]}}" for _, name, fmt in columns)]
    lines += [f"{r['step']:>6}" + "".join(f"  {r.get(key, float('nan')):{fmt}}" for key, _, fmt in columns)
              for r in records]
    if len(records) >= 1 and "answers" in records[0]:
        first, last = records[0], records[-1]

        def cut(text):
            return shorten(text, width)

        for i, ex in enumerate(examples[:samples]):
            lines += [f"- prompt:        {cut(ex.prompt[-1][1])}",
                      f"  demonstration: {cut(ex.demonstration)}",
                      f"  step {first['step']:<6} {cut(first['answers'][i])}"]
            if last is not first:
                lines.append(f"  step {last['step']:<6} {cut(last['answers'][i])}")
    return "\n".join(lines)
