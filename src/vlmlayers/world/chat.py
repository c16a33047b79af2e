"""The tiny world's chat template, renderable without loading transformers."""

from __future__ import annotations

import functools

from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE = "<image>"

REPLY_START = "assistant :"  # what every reply follows (the chat-tuning loss starts after it)

# Turns render as "user : ... assistant : ..."; a finished assistant turn ends with </s>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] }} :"
    "{%- if message['content'] is string %} {{ message['content'] }}"
    "{%- else %}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' %} <image>{%- else %} {{ item['text'] }}{%- endif -%}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %} </s>{%- endif %} "
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}assistant :{%- endif -%}"
)


@functools.cache
def _compiled_template():
    return ImmutableSandboxedEnvironment().from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict]) -> str:
    """Render a whole conversation with CHAT_TEMPLATE (as the tokenizer will, before it exists)."""
    return _compiled_template().render(messages=messages)
