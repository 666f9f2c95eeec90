"""Prompt text on its way to the engine: the character bounds that refuse a prompt without
tokenizing it, then chat rendering and tokenizing, off the event loop when large. Both run only
for a request that admission took (see `generation.launch`)."""

from __future__ import annotations

from collections.abc import Sequence

from server.api.deps import EngineProtocol, Services
from server.api.errors import ApiError
from server.engine.chat import NoChatTemplate

# Work above this many characters (a chat message counting MESSAGE_CHARS more, for the template's
# per-message cost) is rendered and tokenized away from the event loop (`engine.encode_off_loop`:
# a thread for a fast tokenizer, which releases the GIL; a helper process for Python work).
OFF_LOOP_CHARS = 4096
MESSAGE_CHARS = 32

Messages = list[dict[str, str]]


def is_off_loop(num_chars: int, num_messages: int = 0) -> bool:
    """Whether rendering/tokenizing this much belongs in a thread."""
    return num_chars + MESSAGE_CHARS * num_messages > OFF_LOOP_CHARS


def num_chars_of(prompts: Sequence[str | list[int]], messages: Messages | None) -> list[int]:
    """Characters of each text prompt (a chat's messages are its one prompt); ids count none."""
    if messages is not None:
        return [sum(len(m["content"]) for m in messages)]
    return [len(p) for p in prompts if isinstance(p, str)]


def check_prompt_chars(services: Services, num_chars: list[int]) -> None:
    """Refuse, before tokenizing, text that cannot fit: more characters in all than
    `--max-prompt-chars`, or a prompt longer than its token limit times the most characters one
    token of this model stands for (it has more tokens than the limit, whatever they are)."""
    limits, engine = services.limits, services.engine
    if sum(num_chars) > limits.max_prompt_chars:
        raise ApiError(
            422,
            "invalid_request",
            f"the prompt text has {sum(num_chars)} characters; at most {limits.max_prompt_chars} are "
            "allowed per request (--max-prompt-chars)",
        )
    longest, max_len = engine.max_token_chars, engine.stats().max_len
    for count in num_chars:
        at_least = -(-count // longest)  # tokens, since none covers more than `longest` characters
        if limits.max_prompt_tokens is not None and at_least > limits.max_prompt_tokens:
            raise ApiError(
                422,
                "invalid_request",
                f"the prompt has {count} characters, so at least {at_least} tokens; at most "
                f"{limits.max_prompt_tokens} are allowed",
            )
        if at_least >= max_len:
            message = (
                f"the prompt has {count} characters, so at least {at_least} tokens (no token of this "
                f"model covers more than {longest}); the context holds {max_len} positions in all"
            )
            raise ApiError(422, "context_too_long", message)


async def encode_prompts(
    engine: EngineProtocol,
    prompts: Sequence[str | list[int]],
    add_special_tokens: bool,
    messages: Messages | None = None,
) -> list[list[int]]:
    """Token ids of each prompt (text is tokenized; ids pass as they are), or of the one prompt the
    chat template renders from `messages`; large work away from the event loop."""
    try:
        if is_off_loop(sum(num_chars_of(prompts, messages)), len(messages or ())):
            return await engine.encode_off_loop(prompts, messages, add_special_tokens)
        texts = prompts if messages is None else [engine.render_chat(messages)]
        return [engine.encode(p, add_special_tokens) if isinstance(p, str) else list(p) for p in texts]
    except NoChatTemplate as exc:
        raise ApiError(422, "chat_template_missing", str(exc)) from None
