"""The chat rendering for a model whose tokenizer has no chat template (base models such as
Gemma 3 270M), so probe prompts, task data and evaluation go through one code path.

Plain text, one turn per line block (README "Models without a chat template")::

    <bos>{system}\\n\\nUser: {user}\\nAssistant: {answer}<eos>\\nUser: ...\\nAssistant:

Other roles (tool results) render as ``Tool: {content}``. An assistant turn ends with the
tokenizer's end-of-sequence token, which is what training labels through (as the chat
models' end-of-turn tokens); the generation prompt is ``Assistant:``, so an answer starts with
a space, the way base models continue text.
"""

from __future__ import annotations

PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}"
    "{{ eos_token }}\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the plain-text one; True if it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return True
