"""Five kinds of prefix in one mixed batch, each equal to its own reference token for token.

- PEFT prefix tuning, Cartridges and prompt tuning / P-tuning: PEFT's full-forward greedy (DESIGN.md
  oracle);
- a text prefix: the plain model on the text's tokens followed by the prompt's.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from transformers import AutoTokenizer

from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Oracle, prompt_of_length, save_adapter, save_tiny_model, unambiguous_case

SYSTEM_PROMPT = "You are a terse assistant. Answer in one line, café-style: «oui»."
MAX_NEW_TOKENS = 10
KINDS = ["prefix_tuning", "cartridge", "prompt_tuning", "p_tuning", "text"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def kinds_setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    kind = request.param
    root = tmp_path_factory.mktemp(f"kinds-{kind}")
    model_dir = save_tiny_model(kind, root / "model")
    adapters = {
        "prefix_tuning": save_adapter(model_dir, root / "pt", 6, seed=1),
        "cartridge": save_adapter(model_dir, root / "cartridge", 9, seed=4, peft_type="CARTRIDGE"),
        "prompt_tuning": save_adapter(model_dir, root / "prompt", 5, seed=2, peft_type="PROMPT_TUNING"),
        "p_tuning": save_adapter(model_dir, root / "ptune", 7, seed=3, peft_type="P_TUNING"),
    }
    text_ids = AutoTokenizer.from_pretrained(model_dir).encode(SYSTEM_PROMPT, add_special_tokens=False)
    plain = Oracle(model_dir, None)
    oracles = {name: Oracle(model_dir, a) for name, a in adapters.items()}
    cases = []  # (kind, prompt, expected)
    for i in range(20):
        name = KINDS[i % len(KINDS)]
        length = 1 + (i * 7) % 40
        if name == "text":
            prompt, expected = _text_case(plain, text_ids, length, 500 * (i + 1))
        else:
            prompt, expected = unambiguous_case(oracles[name], length, 500 * (i + 1), MAX_NEW_TOKENS, 1e-3)
        cases.append((name, prompt, expected))
    return kind, root, model_dir, adapters, text_ids, cases


def _text_case(plain: Oracle, text_ids: list[int], length: int, seed: int) -> tuple[list[int], list[int]]:
    """Reference for a text prefix: the plain model on text + prompt; the prompt varies until unambiguous."""
    for attempt in range(50):
        prompt = prompt_of_length(length, seed + attempt)
        expected, margin = plain.greedy(text_ids + prompt, MAX_NEW_TOKENS)
        if margin > 1e-3:
            return prompt, expected
    raise AssertionError("no unambiguous text case")


def test_five_kinds_in_one_batch_match_their_references(kinds_setup) -> None:  # type: ignore[no-untyped-def]
    kind, root, model_dir, adapters, text_ids, cases = kinds_setup
    with (
        ServerProcess(root / "data", "--model", str(model_dir)) as server,
        httpx.Client(timeout=60) as client,
    ):
        for name, adapter in adapters.items():
            response = upload_adapter(client, server, f"k:{name}", adapter.weights, adapter.config)
            assert response.status_code == 201, response.text
            assert (
                response.json()["source"] == name
                and response.json()["prefix_len"] == adapter.num_virtual_tokens
            )
        text = client.put(
            server.url + "/admin/prefixes/k:text",
            files={"text": (None, SYSTEM_PROMPT)},
            headers=server.admin_headers,
        )
        assert text.status_code == 201, text.text
        assert text.json()["source"] == "text" and text.json()["prefix_len"] == len(text_ids)
        shown = client.get(server.url + "/admin/prefixes/k:p_tuning", headers=server.admin_headers).json()
        assert shown["source"] == "p_tuning"

        async def run() -> list[dict]:
            async with httpx.AsyncClient(timeout=120) as ac:
                bodies = [
                    {
                        "task_id": f"k:{name}",
                        "input_ids": prompt,
                        "max_new_tokens": MAX_NEW_TOKENS,
                        "ignore_eos": True,
                    }
                    for name, prompt, _ in cases
                ]
                responses = await asyncio.gather(*(ac.post(server.url + "/generate", json=b) for b in bodies))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            return [r.json() for r in responses]

        results = asyncio.run(run())
        for result, (name, prompt, expected) in zip(results, cases, strict=True):
            assert result["token_ids"] == expected, f"{name}, prompt of {len(prompt)}"
        metrics = client.get(server.url + "/metrics").text
        assert "prefix_server_batch_size_sum" in metrics


def test_bad_text_and_soft_prompt_uploads(kinds_setup) -> None:  # type: ignore[no-untyped-def]
    kind, root, model_dir, adapters, _, _ = kinds_setup
    with (
        ServerProcess(root / "data-bad", "--model", str(model_dir)) as server,
        httpx.Client(timeout=60) as client,
    ):
        url, headers = server.url + "/admin/prefixes/k:bad", server.admin_headers
        empty = client.put(url, files={"text": (None, "   ")}, headers=headers)
        assert empty.status_code == 422 and empty.json()["error"]["code"] == "invalid_prefix"
        too_long = client.put(url, files={"text": (None, "x" * 300)}, headers=headers)  # 300 tokens > 255
        assert too_long.status_code == 422 and "does not fit" in too_long.json()["error"]["message"]
        both = client.put(
            url,
            files={"text": (None, "hi"), "weights": ("w", adapters["prompt_tuning"].weights)},
            headers=headers,
        )
        assert both.status_code == 422
        not_utf8 = client.put(url, files={"text": ("t.txt", b"\xff\xfe")}, headers=headers)
        assert not_utf8.status_code == 422
        config = json.loads(adapters["prompt_tuning"].config)
        config["num_virtual_tokens"] += 2
        mismatch = upload_adapter(
            client, server, "k:bad", adapters["prompt_tuning"].weights, json.dumps(config).encode()
        )
        assert mismatch.status_code == 422 and "num_virtual_tokens" in mismatch.json()["error"]["message"]
        assert client.get(url, headers=headers).status_code == 404  # nothing was stored
