"""Chat prompts: messages rendered to text by the model's own chat template
(`tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)`, which runs it
in transformers' sandboxed Jinja), or by the operator's `--chat-template` file in its place, as HF
and vLLM accept. The text is then encoded like any text prompt. A model with neither gets a clear
refusal, never a made-up format."""

from pathlib import Path
from typing import Any

from server.engine.errors import InvalidInput


class NoChatTemplate(InvalidInput):
    """The tokenizer has no chat template and the operator gave none."""


def use_chat_template(tokenizer: Any, path: Path | None) -> None:
    """Install the operator's template file (`--chat-template`) on the tokenizer, read once at start-up."""
    if path is None:
        return
    try:
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--chat-template {path}: cannot read the template ({exc})") from None


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for `messages` (`role`, `content`, optionally `name`), ending where the
    assistant's answer starts. Raises NoChatTemplate, or InvalidInput when the template refuses the
    messages (e.g. roles that do not alternate)."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(
            "this model's tokenizer has no chat template, so chat messages cannot be turned into a prompt: "
            "use /v1/completions with a prompt of your own, or start the server with --chat-template FILE "
            "(a Jinja template, as Hugging Face tokenizers use)"
        )
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2 TemplateError, including the template's own raise_exception()
        raise InvalidInput(f"the chat template could not render these messages: {exc}") from None
    if not isinstance(text, str):
        raise InvalidInput("the chat template did not render to text")
    return text
