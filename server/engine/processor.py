"""The front door's text side: prompts and chat messages to checked token ids, token ids to text.

Runs on the caller's side (the event loop, or a worker thread for large inputs), never on the
engine thread: the core sees only token ids that fit the context.
"""

from collections.abc import Sequence

from prefix_store.entry import PrefixEntry
from prefix_store.errors import InvalidPrefix
from server.engine.chat import render_chat
from server.engine.errors import ContextTooLong, InvalidInput
from server.engine.model_loader import LoadedModel, longest_token_chars
from server.engine.request import SamplingParams
from server.engine.tokenize import Messages, OffLoopTokenizer, encode_text


class Processor:
    """Tokenization, validation and detokenization for one model and a `max_len`-position context."""

    def __init__(self, loaded: LoadedModel, max_len: int) -> None:
        self.loaded = loaded
        self.max_len = max_len
        self.max_token_chars = longest_token_chars(loaded.tokenizer)  # once: a prompt's bound in characters
        self.off_loop = OffLoopTokenizer(loaded.tokenizer)

    def close(self) -> None:
        self.off_loop.close()

    def token_text(self, token_id: int) -> str:
        """One token as text (may be partial UTF-8, shown as the decoder shows it)."""
        return self.loaded.decode([token_id])

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return encode_text(self.loaded.tokenizer, text, add_special_tokens)

    async def encode_off_loop(
        self, prompts: Sequence[str | list[int]], messages: Messages | None, add_special_tokens: bool
    ) -> list[list[int]]:
        """Large work: token ids of each prompt, or of the one prompt `messages` render to, away
        from the event loop (see engine/tokenize.py)."""
        return await self.off_loop.prepare(prompts, messages, add_special_tokens)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Chat messages as prompt text, by the model's chat template (see engine/chat.py)."""
        return render_chat(self.loaded.tokenizer, messages)

    def encode_prefix_text(self, text: str, max_prefix_len: int) -> list[int]:
        """A text prefix's token ids; a text longer than `max_prefix_len` of the tokenizer's longest
        tokens is refused (InvalidPrefix) before tokenizing."""
        max_chars = max_prefix_len * self.max_token_chars
        if len(text) > max_chars:
            raise InvalidPrefix(
                f"the text prefix does not fit: {len(text)} characters, more than "
                f"{max_prefix_len} tokens hold (at most {max_chars} with this tokenizer)"
            )
        return self.encode(text, add_special_tokens=False)

    def validate(self, prefix: PrefixEntry, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidInput (empty prompt, ids outside the vocabulary) or ContextTooLong
        (prefix + prompt + max_new_tokens beyond the context)."""
        if not prompt_ids:
            raise InvalidInput("the prompt is empty: send at least one token")
        vocab = self.loaded.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidInput(f"token ids must be in [0, {vocab}): got {bad[:5]}")
        needed = prefix.meta.prefix_len + len(prompt_ids) + params.max_new_tokens
        if needed > self.max_len:
            raise ContextTooLong(
                f"prefix ({prefix.meta.prefix_len}) + prompt ({len(prompt_ids)}) + max_new_tokens "
                f"({params.max_new_tokens}) = {needed} exceeds the context of {self.max_len} positions"
            )
