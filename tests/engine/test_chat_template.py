"""Chat prompts from templates (`server.engine.chat`): the tokenizer's own, the operator's file in
its place, and clear refusals (no template, a template refusing the messages, an unreadable file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import ByT5Tokenizer

from server.engine.chat import NoChatTemplate, render_chat, use_chat_template
from server.engine.errors import InvalidInput

MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]


def test_without_a_template_chat_is_refused_with_what_to_do() -> None:
    with pytest.raises(NoChatTemplate, match="--chat-template FILE"):
        render_chat(ByT5Tokenizer(), MESSAGES)


def test_the_operator_template_renders_with_the_generation_prompt(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[A]{% endif %}"
    )
    tokenizer = ByT5Tokenizer()
    use_chat_template(tokenizer, path)
    assert render_chat(tokenizer, MESSAGES) == "[system]S[user]U[A]"


def test_a_template_that_refuses_the_messages_is_invalid_input(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('the first message must be the user') }}{% endif %}"
    )
    tokenizer = ByT5Tokenizer()
    use_chat_template(tokenizer, path)
    with pytest.raises(InvalidInput, match="the first message must be the user"):
        render_chat(tokenizer, MESSAGES)


def test_an_unreadable_template_file_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--chat-template .*missing.jinja"):
        use_chat_template(ByT5Tokenizer(), tmp_path / "missing.jinja")
