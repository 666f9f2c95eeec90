"""Suspicious JSON bodies are parsed in a helper process and refused there when they nest more
containers than any valid request; ordinary bodies never leave the event loop's thread."""

import asyncio
import json

import pytest

from server.api.json_isolated import MAX_CONTAINERS, is_suspicious, parse_checked, pool, unpack

HOSTILE = b'{"model": "t:x", "prompt": [' + b",".join([b"{}"] * 340_000) + b"]}"


def test_ordinary_bodies_are_not_suspicious_hostile_ones_are() -> None:
    ids = json.dumps({"model": "t:x", "prompt": [[5] * 1000] * 32}).encode()
    code = json.dumps({"model": "t:x", "prompt": "{" * 1000 + "}" * 1000}).encode()  # braces in a string
    assert not is_suspicious(ids) and not is_suspicious(code)
    assert is_suspicious(HOSTILE)


def test_parse_checked_returns_values_decode_errors_and_refusals() -> None:
    assert parse_checked(b'{"a": [1, 2]}') == ("ok", {"a": [1, 2]})
    kind, (msg, pos) = parse_checked(b'{"a": [1, 2')
    assert kind == "decode" and pos > 0
    kind, reason = parse_checked(HOSTILE)
    assert kind == "too_many" and str(MAX_CONTAINERS) in reason
    nested = b"[" * (MAX_CONTAINERS + 5) + b"]" * (MAX_CONTAINERS + 5)
    assert parse_checked(nested)[0] in {"too_many", "decode"}  # deep nesting: refused either way
    with pytest.raises(json.JSONDecodeError, match="nests more than"):
        unpack(*parse_checked(HOSTILE), HOSTILE)


def test_the_helper_process_answers() -> None:
    async def run() -> tuple[str, object]:
        return await asyncio.get_running_loop().run_in_executor(pool(), parse_checked, HOSTILE)

    assert asyncio.run(run())[0] == "too_many"
