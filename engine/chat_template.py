"""Chat templates from the GGUF, rendered in a Jinja sandbox (a GGUF is untrusted input).

Both engines render chats through `chat_prompt_parts`, so the llama.cpp and torch engines see the
same prompt for the same messages. Messages are client input: their text is kept apart from the
template's markup, so that only the markup is tokenized with special tokens (a `<|im_end|>` typed in
a message stays text and cannot close the turn).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a GGUF carries no template: ChatML, what most small instruct models are trained on.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool", "developer")


# A message's content while the template renders: private-use characters no client text reaches
# (the template sees only placeholders), padded with a space each side to see whether it trims.
_PLACEHOLDER = " \ue000{}\ue001 "
_RENDERED_PLACEHOLDER = re.compile("( ?)\ue000([0-9]+)\ue001( ?)")

PromptPart = tuple[str, bool]  # (text, is_markup): markup is tokenized with special tokens, text without


class ChatTemplateError(ValueError):
    """The template failed to render these messages (raised by the template itself or malformed)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: Sequence[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    try:
        return _compile(template or CHATML_TEMPLATE).render(
            messages=list(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None


def chat_prompt_parts(
    template: str | None,
    messages: Sequence[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    continuation: str = "",
) -> list[PromptPart]:
    """The chat prompt as (text, is_markup) parts, in order.

    The template renders placeholders instead of the messages' contents, so everything it writes is
    markup; each content goes where its placeholder landed, trimmed if the template trimmed it."""
    placeholders = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    rendered = render_chat(template, placeholders, bos_token=bos_token, eos_token=eos_token)
    parts: list[PromptPart] = []
    pos = 0
    for match in _RENDERED_PLACEHOLDER.finditer(rendered):
        index = int(match.group(2))
        if index >= len(messages):
            raise ChatTemplateError("chat template failed: it writes reserved characters")
        if match.start() > pos:
            parts.append((rendered[pos : match.start()], True))
        content = messages[index]["content"]
        if not match.group(1):
            content = content.lstrip()
        if not match.group(3):
            content = content.rstrip()
        if content:
            parts.append((content, False))
        pos = match.end()
    if pos < len(rendered):
        parts.append((rendered[pos:], True))
    if continuation:
        parts.append((continuation, False))
    return parts
