"""Bad `/generate` input: a clear 4xx naming the problem, and no effect on anyone else."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server_process import ServerProcess
from tests.tiny_models import MAX_POSITIONS

GOOD = {"task_id": "t:good", "input_ids": [5, 6, 7], "max_new_tokens": 8}


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"input_ids": None}, "exactly one"),
        ({"prompt": "x", "input_ids": [1]}, "exactly one"),
        ({"input_ids": []}, "empty"),
        ({"input_ids": None, "prompt": ""}, "empty"),
        ({"input_ids": [5, 999999]}, "token ids"),
        ({"input_ids": [-1]}, "token ids"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 5000}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"surprise": 1}, "surprise"),
        ({"task_id": "bad id!"}, "task_id"),
        ({"task_id": "x" * 129}, "task_id"),
        ({"task_id": ""}, "task_id"),
    ],
)
def test_invalid_request(server: ServerProcess, client: httpx.Client, patch: dict, needle: str) -> None:
    body = {k: v for k, v in {**GOOD, **patch}.items() if v is not None}
    if patch.get("input_ids", 0) is None:
        body.pop("input_ids", None)
    message = _error(client.post(server.url + "/generate", json=body), 422, "invalid_request")
    assert needle in message


def test_malformed_json_and_nan(server: ServerProcess, client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    _error(
        client.post(server.url + "/generate", content=b'{"task_id": "t:good",', headers=headers),
        422,
        "invalid_request",
    )
    raw = b'{"task_id": "t:good", "input_ids": [5], "temperature": NaN}'
    assert "temperature" in _error(
        client.post(server.url + "/generate", content=raw, headers=headers), 422, "invalid_request"
    )


def test_unknown_task(server: ServerProcess, client: httpx.Client) -> None:
    message = _error(
        client.post(server.url + "/generate", json={**GOOD, "task_id": "t:nobody"}), 404, "unknown_task"
    )
    assert "t:nobody" in message


def test_context_overflow_is_refused_before_compute(server: ServerProcess, client: httpx.Client) -> None:
    before = client.get(server.url + "/metrics").text.count("prefix_server_batch_size_count")
    # prefix 4 + prompt 200 + 60 new > 256 positions
    body = {**GOOD, "input_ids": [5] * 200, "max_new_tokens": 60}
    message = _error(client.post(server.url + "/generate", json=body), 422, "context_too_long")
    assert str(MAX_POSITIONS) in message and "200" in message
    assert client.get(server.url + "/metrics").text.count("prefix_server_batch_size_count") == before
    # exactly at the limit is fine
    body = {**GOOD, "input_ids": [5] * 200, "max_new_tokens": MAX_POSITIONS - 204, "ignore_eos": True}
    response = client.post(server.url + "/generate", json=body)
    assert response.status_code == 200 and len(response.json()["token_ids"]) == MAX_POSITIONS - 204


def test_bad_requests_do_not_disturb_good_rows(server: ServerProcess) -> None:
    good = [{**GOOD, "input_ids": [5 + i, 9, 11 + i], "max_new_tokens": 24} for i in range(6)]
    bad = [{**GOOD, "input_ids": [5] * 300}, {**GOOD, "task_id": "t:missing"}, {**GOOD, "top_p": 7}]

    async def run(bodies: list[dict]) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as ac:
            return await asyncio.gather(*(ac.post(server.url + "/generate", json=b) for b in bodies))

    alone = [r.json()["token_ids"] for r in asyncio.run(run(good))]
    mixed = asyncio.run(run([x for pair in zip(good, bad * 2, strict=True) for x in pair]))
    assert [r.json()["token_ids"] for r in mixed[0::2]] == alone
    assert [r.status_code for r in mixed[1::2]] == [422, 404, 422] * 2


def test_limits_are_checked_before_the_prefix_is_looked_up(
    server: ServerProcess, client: httpx.Client
) -> None:
    body = {**GOOD, "task_id": "t:nobody", "max_new_tokens": 5000}  # also unknown: the limit answers first
    assert "max_new_tokens" in _error(
        client.post(server.url + "/generate", json=body), 422, "invalid_request"
    )
