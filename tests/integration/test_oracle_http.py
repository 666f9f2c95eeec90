"""The key test (DESIGN.md oracle): served greedy outputs equal PEFT's full-forward reference.

A real server process (real HTTP, its embedded real Redis), PEFT adapters saved with
`save_pretrained` and uploaded through the admin API, then concurrent mixed-task requests.
Then the server restarts on the same data dir and serves the same outputs.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server_process import ServerProcess, metric_value, upload_adapter
from tests.tiny_models import (
    Adapter,
    Oracle,
    prompt_of_length,
    save_adapter,
    save_tiny_model,
    unambiguous_case,
)

# (num_virtual_tokens, prefix_projection): includes 1, >= 32, and a projected one
ADAPTERS = [(1, False), (4, False), (9, True), (17, False), (32, False)]
PROMPT_LENGTHS = [1, 2, 3, 5, 8, 11, 13, 17, 20, 24, 29, 31, 36, 40, 44, 47, 50, 53, 57, 60, 6, 15, 33, 60]
MAX_NEW_TOKENS = 12
MIN_MARGIN = 1e-3  # reference top-1/top-2 logit gap: equality must not be luck
EOS = 1  # the tiny models' eos_token_id (ByT5's </s>)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model_dir = save_tiny_model(kind, root / "model")
    adapters = [
        save_adapter(model_dir, root / f"adapter{i}", n, seed=10 + i, projection=proj)
        for i, (n, proj) in enumerate(ADAPTERS)
    ]
    cases = []  # (task index, prompt ids, expected ids)
    oracles = [Oracle(model_dir, a) for a in adapters]
    for i, length in enumerate(PROMPT_LENGTHS):
        task = i % len(adapters)
        prompt, expected = unambiguous_case(oracles[task], length, 1000 * (i + 1), MAX_NEW_TOKENS, MIN_MARGIN)
        cases.append((task, prompt, expected))
    return kind, root, model_dir, adapters, cases


async def _generate_all(url: str, kind: str, cases: list[tuple[int, list[int], list[int]]]) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(task: int, prompt: list[int]) -> dict:
            body = {"task_id": f"{kind}:task{task}", "input_ids": prompt, "max_new_tokens": MAX_NEW_TOKENS}
            response = await client.post(url + "/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        return await asyncio.gather(*(one(task, prompt) for task, prompt, _ in cases))


def _check(
    results: list[dict], adapters: list[Adapter], cases: list[tuple[int, list[int], list[int]]]
) -> None:
    for result, (task, prompt, expected) in zip(results, cases, strict=True):
        if EOS in expected:  # the server stops at EOS (and returns it); the reference ran on
            expected = expected[: expected.index(EOS) + 1]
        assert result["token_ids"] == expected, f"task{task} prompt len {len(prompt)}"
        assert result["finish_reason"] == ("eos" if expected[-1] == EOS else "length")
        assert result["usage"] == {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(expected),
            "prefix_tokens": adapters[task].num_virtual_tokens,
        }


def test_mixed_batch_matches_peft_and_survives_restart(setup) -> None:  # type: ignore[no-untyped-def]
    kind, root, model_dir, adapters, cases = setup
    data_dir = root / "data"
    flags = ["--model", str(model_dir), "--max-batch-size", "32"]
    with ServerProcess(data_dir, *flags) as server, httpx.Client(timeout=60) as client:
        for i, adapter in enumerate(adapters):
            response = upload_adapter(client, server, f"{kind}:task{i}", adapter.weights, adapter.config)
            assert response.status_code == 201, response.text
            assert response.json()["prefix_len"] == adapter.num_virtual_tokens
        results = asyncio.run(_generate_all(server.url, kind, cases))
        _check(results, adapters, cases)
        metrics = client.get(server.url + "/metrics").text
        # rows really shared forward passes: some step carried more than one row
        steps = metric_value(metrics, "prefix_server_batch_size_count")
        single_row_steps = metric_value(metrics, 'prefix_server_batch_size_bucket{le="1.0"}')
        assert single_row_steps < steps
        assert metric_value(metrics, "prefix_server_batch_size_sum") / steps > 2

    with ServerProcess(data_dir, *flags) as server, httpx.Client(timeout=60) as client:
        listed = client.get(server.url + "/admin/prefixes", headers=server.admin_headers).json()
        assert sorted(item["task_id"] for item in listed["items"]) == [f"{kind}:task{i}" for i in range(5)]
        results = asyncio.run(_generate_all(server.url, kind, cases[:8]))
        _check(results, adapters, cases[:8])


def test_text_prompt_alone_equals_in_batch(setup) -> None:  # type: ignore[no-untyped-def]
    """A row's output is the same alone and in a mixed batch, for greedy and seeded sampling."""
    kind, root, model_dir, adapters, _ = setup
    sampled = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234}
    probe = {"task_id": f"{kind}:task1", "prompt": "Hello, prefix!", "max_new_tokens": 16, "ignore_eos": True}
    others = [
        {"task_id": f"{kind}:task{i % 5}", "input_ids": prompt_of_length(5 + 7 * i, i), "max_new_tokens": 20,
         "temperature": 0.7 * (i % 2), "seed": i}
        for i in range(10)
    ]  # fmt: skip
    with (
        ServerProcess(root / "data2", "--model", str(model_dir)) as server,
        httpx.Client(timeout=60) as client,
    ):
        for i, adapter in enumerate(adapters[:5]):
            assert (
                upload_adapter(client, server, f"{kind}:task{i}", adapter.weights, adapter.config).status_code
                == 201
            )

        async def run(bodies: list[dict]) -> list[dict]:
            async with httpx.AsyncClient(timeout=120) as ac:
                responses = await asyncio.gather(*(ac.post(server.url + "/generate", json=b) for b in bodies))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            return [r.json() for r in responses]

        for extra in ({}, sampled):
            alone = asyncio.run(run([{**probe, **extra}]))[0]
            again = asyncio.run(run([{**probe, **extra}]))[0]
            mixed = asyncio.run(run(others[:5] + [{**probe, **extra}] + others[5:]))[5]
            assert mixed["token_ids"] == alone["token_ids"] == again["token_ids"]
            assert mixed["text"] == alone["text"]
            assert len(alone["token_ids"]) == 16
