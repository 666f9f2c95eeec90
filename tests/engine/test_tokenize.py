"""Large prompt work off the event loop (issue 25, findings 3-5): a Python tokenizer and chat
templates hold the GIL in any thread, so their large work runs in a helper process, with exactly
the ids and errors it has in this one."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest
from transformers import ByT5Tokenizer

from server.engine.errors import InvalidInput
from server.engine.model_loader import longest_token_chars
from server.engine.tokenize import OffLoopTokenizer, prepare

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


def test_python_work_runs_in_the_helper_process_once_it_is_ready() -> None:
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = TEMPLATE
    assert not tokenizer.is_fast
    off = OffLoopTokenizer(tokenizer)
    prompts: list[str | list[int]] = ["héllo wörld " * 500, [5, 6], "<extra_id_3> x"]
    messages = [{"role": "user", "content": "hi " * 2000}] * 3
    expected = prepare(tokenizer, prompts, None, False)
    others = set(multiprocessing.active_children())  # e.g. the JSON helper of an earlier test

    async def main() -> None:
        assert await off.prepare(prompts, None, False) == expected  # in a thread: the helper starts
        for _ in range(600):
            if off.is_ready:
                break
            await asyncio.sleep(0.1)
        assert off.is_ready and len(set(multiprocessing.active_children()) - others) == 1
        assert await off.prepare(prompts, None, False) == expected
        assert await off.prepare([], messages, True) == prepare(tokenizer, [], messages, True)
        with pytest.raises(InvalidInput, match="not valid Unicode"):
            await off.prepare(["a\ud800"], None, False)

    try:
        asyncio.run(main())
    finally:
        off.close()


def test_the_longest_token_counts_added_tokens() -> None:
    assert longest_token_chars(ByT5Tokenizer()) == len("<extra_id_124>")
