"""Teacher contexts: the prompt with the demonstration placed in front, as chat messages.

``paper`` is the SDFT paper's wording; ``fewshot`` shows the demonstration as an earlier chat turn
on the same question. Any other string is a format with {prompt} and {demonstration}.
"""
from __future__ import annotations

from sdft.data.examples import PLAIN

PAPER = (
    "{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)
TEMPLATES = ("paper", "fewshot")


ASKING = ("user", PLAIN)  # the roles a question comes in (PLAIN: a plain-text prompt, sdft.data.examples)


def _last_question(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in ASKING:
            return i
    raise ValueError("prompt messages hold no user turn")


def check_template(template: str) -> str:
    """``template`` if it is a known name or a format string with {prompt} and {demonstration} and no
    other field (formatted with dummy values here, so a stray brace is one line before the model loads)."""
    if template in TEMPLATES:
        return template
    if "{prompt}" not in template or "{demonstration}" not in template:
        raise ValueError(f"teacher_template {template!r} is neither one of {TEMPLATES} nor a format string "
                         "with {prompt} and {demonstration}")
    try:
        template.format(prompt="", demonstration="")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        what = f"field {{{err.args[0]}}}" if isinstance(err, (KeyError, IndexError)) else f"format ({err})"
        raise ValueError(f"teacher_template {template!r} has a {what} besides {{prompt}} and {{demonstration}}; "
                         "write a literal brace as {{ or }}") from None
    return template


def teacher_messages(prompt: list[dict], demonstration: str, template: str = "paper") -> list[dict]:
    """Chat messages the teacher sees for ``prompt`` (chat messages) with ``demonstration``."""
    last = _last_question(prompt)
    head, question, role = prompt[:last], prompt[last]["content"], prompt[last]["role"]
    if template == "fewshot":
        return head + [{"role": role, "content": question},
                       {"role": "assistant", "content": demonstration},
                       {"role": role, "content": question}]
    fmt = PAPER if template == "paper" else check_template(template)
    return head + [{"role": role, "content": fmt.format(prompt=question, demonstration=demonstration)}]
