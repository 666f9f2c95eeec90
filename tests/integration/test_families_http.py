"""Every tested model family, with the tokenizer files it ships, against the PEFT oracle over HTTP.

Per family: a tiny checkpoint written as the family ships it (tests/tiny_families.py: a
sentencepiece or a tiktoken `tokenizer.model` alone, or a byte-level BPE `tokenizer.json`;
Mistral's weights sharded), loaded by the app's own start-up (`create_app`, in process, real Redis), PEFT
prefix-tuning adapters uploaded through the admin API, then text prompts of different tasks sent
together. Each answer must equal PEFT's full-forward greedy reference token for token, and its
text the tokenizer's decoding of those tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from server.app import create_app
from server.config import Settings
from tests.redis_server import RedisProcess
from tests.server_process import metric_value
from tests.tiny_families import FAMILIES, corpus, save_family_model
from tests.tiny_models import Adapter, Oracle, save_adapter

ADAPTERS = [(1, False), (6, True), (13, False)]  # (num_virtual_tokens, prefix_projection)
NUM_PROMPTS = 6
MAX_NEW_TOKENS = 8
MIN_MARGIN = 1e-3  # reference top-1/top-2 logit gap: equality must not be luck
SHARDED = {"mistral": "40KB"}  # families saved as several safetensors shards plus an index
ADMIN = {"Authorization": "Bearer families-admin"}


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisProcess]:
    with RedisProcess() as proc:
        yield proc


def _cases(model_dir: Path, adapters: list[Adapter]) -> list[tuple[int, str, list[int], list[int]]]:
    """(task, prompt text, its ids, reference ids): sentences of varied length whose reference has
    a wide margin at every step."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    oracles = [Oracle(model_dir, adapter) for adapter in adapters]
    texts = iter(corpus(num_lines=60, seed=7))
    cases = []
    while len(cases) < NUM_PROMPTS:
        task = len(cases) % len(adapters)
        text = next(texts)[: 8 + 9 * len(cases)]  # 8 to 53 characters
        ids = tokenizer.encode(text, add_special_tokens=False)
        expected, margin = oracles[task].greedy(ids, MAX_NEW_TOKENS)
        if margin > MIN_MARGIN:
            cases.append((task, text, ids, expected))
    return cases


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(
    request: pytest.FixtureRequest, redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory
):  # type: ignore[no-untyped-def]
    """(name, model dir, tokenizer, adapters, cases, app client with the adapters uploaded)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model_dir = save_family_model(name, root / "model", seed=5, max_shard_size=SHARDED.get(name))
    adapters = [
        save_adapter(model_dir, root / f"adapter{i}", n, seed=30 + i, projection=projection)
        for i, (n, projection) in enumerate(ADAPTERS)
    ]
    cases = _cases(model_dir, adapters)
    settings = Settings(
        model=str(model_dir), device="cpu", dtype="float32", redis_url=redis_proc.url,
        data_dir=root / "data", admin_token=ADMIN["Authorization"].split()[1],
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        for i, adapter in enumerate(adapters):
            files = {"weights": ("w", adapter.weights), "config": ("c", adapter.config)}
            response = client.put(f"/admin/prefixes/{name}:task{i}", files=files, headers=ADMIN)
            assert response.status_code == 201, response.text
        yield name, model_dir, AutoTokenizer.from_pretrained(model_dir), adapters, cases, client


def test_mixed_text_batch_matches_peft(family: Any) -> None:
    name, model_dir, tokenizer, adapters, cases, client = family
    if FAMILIES[name].tokenizer == "sentencepiece":  # the only tokenizer file it has
        assert (model_dir / "tokenizer.model").exists() and not (model_dir / "tokenizer.json").exists()
    if name in SHARDED:
        assert (model_dir / "model.safetensors.index.json").exists()
        assert not (model_dir / "model.safetensors").exists()

    def generate(case: tuple[int, str, list[int], list[int]]) -> dict[str, Any]:
        body = {"task_id": f"{name}:task{case[0]}", "prompt": case[1], "max_new_tokens": MAX_NEW_TOKENS}
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    steps_before = metric_value(client.get("/metrics").text, "prefix_server_batch_size_count")
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(generate, cases))
    assert tokenizer.eos_token == FAMILIES[name].specials["eos"]
    for result, (task, text, ids, expected) in zip(results, cases, strict=True):
        if (
            tokenizer.eos_token_id in expected
        ):  # the server stops at EOS (and returns it); the reference ran on
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert result["token_ids"] == expected, f"{name} task{task} {text!r}"
        # the incremental text equals decoding every id at once, sentencepiece byte-fallback runs
        # that are not valid UTF-8 included (held until the run closes: engine/postprocess.py)
        assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert result["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(expected),
            "prefix_tokens": adapters[task].num_virtual_tokens,
        }
    metrics = client.get("/metrics").text
    steps = metric_value(metrics, "prefix_server_batch_size_count") - steps_before
    assert steps < len(cases) * MAX_NEW_TOKENS  # rows of different tasks shared forward passes
