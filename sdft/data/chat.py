"""Token ids of chats: a prompt with the assistant turn opened, or a prompt plus its demonstration.

A tokenizer without a chat template (a base model's), or a prompt given as plain text (role ``plain``:
TRL's standard format, ``sdft.data.examples.as_plain``), gets plain text, as TRL tokenizes its string
prompts: the turns' text joined by blank lines, nothing added for the answer to start; a demonstration
follows its prompt's ids directly and ends with EOS (ids joined, not text, so the prompt's tokens stay
a prefix whatever the tokenizer merges).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json

import torch

from sdft.data.examples import PLAIN

SEPARATOR = "\n\n"

RENDER_ARGUMENTS = ("conversation", "messages", "add_generation_prompt", "continue_final_message", "tokenize",
                    "return_tensors", "return_dict", "padding", "truncation", "max_length", "chat_template", "tools",
                    "documents")  # what sdft passes apply_chat_template itself, or what changes what it renders


def json_mapping(name: str, value, keys: str) -> dict:
    """``value`` if it is a mapping of names (``keys`` says of what) to values a config can save (JSON);
    otherwise a one-line error."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"{name} must be a mapping of {keys} to values, got {value!r}")
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold JSON values (saved in the run's config.json), got {value!r}") from None
    return dict(value)


def checked_template_kwargs(name: str, value) -> dict:
    """``value`` if it is a mapping of template variables a config can save (JSON) and sdft does not set
    itself; otherwise a one-line error."""
    value = json_mapping(name, value, "template variable names")
    clash = sorted(set(value) & set(RENDER_ARGUMENTS))
    if clash:
        raise ValueError(f"{name} {clash[0]!r}: sdft sets it when it renders a chat; give template variables only")
    return value


def parse_template_kwargs(name: str, text: str) -> dict:
    """Chat template variables from JSON text (empty: none), checked as ``chat_template_kwargs`` is."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as err:
        raise ValueError(f"{name} must be a JSON object, e.g. '{{\"enable_thinking\": false}}', got {text!r} "
                         f"({err.msg})") from None
    return checked_template_kwargs(name, value)


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def with_template_kwargs(tokenizer, kwargs: dict | None):
    """``tokenizer`` rendering every chat with ``kwargs`` as extra template variables (TRL's
    ``chat_template_kwargs``, e.g. Qwen3's ``enable_thinking=False``), so that every prompt, teacher
    context, demonstration and evaluation of a run renders alike without each caller passing them: a
    shallow copy whose ``apply_chat_template`` adds them. The tokenizer given, and what either saves, are
    unchanged; a copy made before is made again from its original. No kwargs: the original."""
    base = getattr(tokenizer, "_sdft_template_base", tokenizer)
    if not kwargs:
        return base
    wrapped = copy.copy(base)
    wrapped._sdft_template_base = base
    wrapped.apply_chat_template = functools.partial(base.apply_chat_template, **kwargs)
    return wrapped


def template_kwargs_of(tokenizer) -> dict:
    """The template variables ``with_template_kwargs`` gave ``tokenizer`` ({} for a plain one)."""
    if getattr(tokenizer, "_sdft_template_base", None) is None:
        return {}
    return dict(tokenizer.apply_chat_template.keywords)


@contextlib.contextmanager
def _template_errors(where: str | None):
    """A template that does not parse, or refuses a chat (its ``raise_exception``: Gemma's takes no system
    turn), as one line naming ``where`` (the row)."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    try:
        yield
    except TemplateSyntaxError as err:
        raise ValueError(f"the tokenizer's chat template does not parse ({err}, line {err.lineno}): fix it (the "
                         "model folder's chat_template.jinja or tokenizer_config.json)") from None
    except TemplateError as err:
        hint = (": fold the system message into the first user turn" if "system" in str(err).lower() else
                ": give the row as the template takes it")
        raise ValueError(f"{where or 'a chat'}: the tokenizer's chat template refuses it ({err}){hint}") from None


def chat_ids(tokenizer, messages: list[dict], device, add_generation_prompt: bool = True,
             where: str | None = None) -> torch.Tensor:
    """Token ids [P] of chat messages, by default with the assistant turn opened. A chat the template refuses
    is one line naming ``where`` (the row)."""
    if not has_chat_template(tokenizer) or messages[0]["role"] == PLAIN:
        return torch.tensor(text_ids(tokenizer, messages, add_generation_prompt), device=device)
    with _template_errors(where):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    return ids[0].to(device)


CHAT_BATCH = 256  # chats a templated batch renders and tokenizes together


def chat_ids_many(tokenizer, chats: list[list[dict]], device, wheres: list[str],
                  add_generation_prompt: bool = True) -> list[torch.Tensor]:
    """``chat_ids`` of many chats: the same ids, but templated chats go through
    ``apply_chat_template`` a batch at a time, one tokenizer call a batch instead of one a chat (20,000 rows:
    10.4 s against 30.8 s, ``benchmarks/bench_encode_rows.py``). A batch the template refuses is done again
    chat by chat, so the line names the row."""
    from jinja2.exceptions import TemplateError

    out: list[torch.Tensor | None] = [None] * len(chats)
    templated = has_chat_template(tokenizer)
    batched = []
    for i, chat in enumerate(chats):
        if templated and chat[0]["role"] != PLAIN:
            batched.append(i)
        else:
            out[i] = chat_ids(tokenizer, chat, device, add_generation_prompt, where=wheres[i])
    for start in range(0, len(batched), CHAT_BATCH):
        part = batched[start:start + CHAT_BATCH]
        try:
            ids = tokenizer.apply_chat_template([chats[i] for i in part], return_dict=True,
                                                add_generation_prompt=add_generation_prompt)["input_ids"]
        except TemplateError:  # chat by chat, so that the line names the row
            ids = [chat_ids(tokenizer, chats[i], "cpu", add_generation_prompt, where=wheres[i]).tolist() for i in part]
        for i, row in zip(part, ids):
            out[i] = torch.tensor(row, dtype=torch.long, device=device)
    return out


def text_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Plain-text token ids of chat messages (no chat template): see the module docstring."""
    if not add_generation_prompt and messages[-1]["role"] == "assistant":
        answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        return text_ids(tokenizer, messages[:-1]) + answer + [tokenizer.eos_token_id]
    return tokenizer(SEPARATOR.join(m["content"] for m in messages))["input_ids"]


def demonstration_ids(tokenizer, example, device, max_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(ids [P+D], number of prompt tokens P): the chat with the demonstration as the assistant turn."""
    return demonstration_ids_many(tokenizer, [example], device, max_tokens)[0]


def demonstration_ids_many(tokenizer, examples, device, max_tokens: int | None = None) -> list[tuple]:
    """``demonstration_ids`` of many rows, their chats rendered and tokenized a batch at a time
    (``chat_ids_many``)."""
    wheres = [example.where for example in examples]
    prompts = chat_ids_many(tokenizer, [example.messages() for example in examples], device, wheres)
    fulls = chat_ids_many(tokenizer, [example.messages() + [{"role": "assistant", "content": example.demonstration}]
                                      for example in examples], device, wheres, add_generation_prompt=False)
    return [_with_demonstration(prompt, full, example, max_tokens)
            for prompt, full, example in zip(prompts, fulls, examples)]


def _with_demonstration(prompt, full, example, max_tokens: int | None) -> tuple[torch.Tensor, int]:
    """(full, P) once the prompt's ids are checked to be a prefix of the full chat's, within ``max_tokens``."""
    if full.numel() <= prompt.numel() or not torch.equal(full[: prompt.numel()], prompt):
        raise ValueError("the chat template does not extend the prompt with the assistant turn; "
                         "scoring a demonstration needs the prompt tokens to be a prefix of the full chat")
    if max_tokens is not None and full.numel() > max_tokens:
        raise ValueError(f"{example.where or 'an example'}: the prompt with its demonstration has {full.numel()} "
                         f"tokens, over max_prompt_length + max_completion_length = {max_tokens}")
    return full, prompt.numel()
