"""Configurable request limits, each answered with a clear 4xx in the endpoint's error shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import serving_good_task
from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess
from tests.tiny_models import Adapter

FLAGS = (
    "--max-body-bytes",
    "4096",
    "--max-prompt-tokens",
    "8",
    "--max-stop-strings",
    "1",
    "--max-new-tokens",
    "16",
)


@pytest.fixture(scope="module")
def limited(
    gpt2_dir: Path, adapter: Adapter, redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("limited") / "data"
    with serving_good_task(gpt2_dir, adapter, redis_proc, data_dir, *FLAGS) as proc:
        yield proc


def _generate(server: ServerProcess, **fields: object) -> httpx.Response:
    body = {"task_id": "t:good", "input_ids": [5, 6], "max_new_tokens": 2, **fields}
    return httpx.post(server.url + "/generate", json=body, timeout=30)


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    return str(error["message"])


def test_body_over_max_body_bytes_is_413_announced_or_streamed(limited: ServerProcess) -> None:
    padding = "x" * 5000
    announced = _generate(limited, prompt=padding, input_ids=None)
    assert "4096 bytes" in _error(announced, 413, "too_large")
    v1 = httpx.post(limited.url + "/v1/completions", json={"model": "t:good", "prompt": padding})
    assert v1.status_code == 413 and v1.json()["error"]["type"] == "invalid_request_error"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        yield b'{"task_id": "t:good", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    streamed = httpx.post(
        limited.url + "/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    _error(streamed, 413, "too_large")
    assert _generate(limited).status_code == 200  # a normal body still passes


def test_prompt_stop_and_max_new_tokens_limits(limited: ServerProcess) -> None:
    assert "at most 8" in _error(_generate(limited, input_ids=list(range(5, 14))), 422, "invalid_request")
    assert _generate(limited, input_ids=list(range(5, 13))).status_code == 200
    assert "at most 1 stop" in _error(_generate(limited, stop=["a", "b"]), 422, "invalid_request")
    assert _generate(limited, stop=["a"]).status_code == 200
    assert "<= 16" in _error(_generate(limited, max_new_tokens=17), 422, "invalid_request")
    completion = {"model": "t:good", "prompt": [5], "max_tokens": 1, "stop": ["a", "b"]}
    v1 = httpx.post(limited.url + "/v1/completions", json=completion, timeout=30)
    assert v1.status_code == 400 and v1.json()["error"]["code"] == "invalid_request"
    long_prompt = {"model": "t:good", "prompt": list(range(5, 15)), "max_tokens": 1}
    assert httpx.post(limited.url + "/v1/completions", json=long_prompt, timeout=30).status_code == 400
