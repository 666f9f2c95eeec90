"""Streamed text is exactly the final text, multi-byte characters included.

With a byte-level tokenizer every non-ASCII character is split over several tokens, so
random greedy outputs exercise the split constantly.
"""

from __future__ import annotations

import json

import httpx

from tests.server_process import ServerProcess


def _stream_text(client: httpx.Client, url: str, body: dict) -> tuple[str, list[int]]:
    text, ids = "", []
    with client.stream("POST", url + "/generate", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                text += event["text"]
                ids += event["token_ids"]
    return text, ids


def test_streamed_text_equals_final_text_across_multibyte_splits(
    server: ServerProcess, client: httpx.Client
) -> None:
    non_ascii = 0
    for i in range(12):
        body = {
            "task_id": "t:good",
            "prompt": f"Grüße {i} — ünïcödé ✓",
            "max_new_tokens": 60,
            "ignore_eos": True,
        }
        whole = client.post(server.url + "/generate", json=body).json()
        streamed, ids = _stream_text(client, server.url, body)
        assert ids == whole["token_ids"]
        assert streamed == whole["text"]
        assert "\ufffd" not in streamed
        non_ascii += sum(1 for ch in whole["text"] if ord(ch) > 127)
    assert non_ascii > 0  # multi-byte characters really were produced (and split over tokens)
