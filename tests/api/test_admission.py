"""Admission before work, and all-or-nothing launch (issue 25, findings 3, 4 and 7): a request
that the rate limiter or the queue refuses is never rendered, tokenized or looked up, and a
request whose generations cannot all be queued leaves none behind."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
import torch

from prefix_store.entry import PrefixEntry, PrefixMeta
from server.api.callers import Caller
from server.api.deps import PrefixesProtocol, RequestLimits, Services
from server.api.generation import start_all
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import QueueFull
from server.engine.kv_cache import KVLayout, SlotKVCache
from server.engine.model_loader import ModelOptions, load_model
from server.engine.request import SamplingParams
from server.engine.stats import StepStats
from tests.api.conftest import serving_good_task
from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess, metric_value
from tests.tiny_models import MAX_POSITIONS, Adapter


def test_a_refused_chat_request_is_never_rendered(server: ServerProcess, client: httpx.Client) -> None:
    """This server's model has no chat template: a chat request that gets rendered is answered
    400 chat_template_missing. With its key's one request spent, the same request is answered 429
    (the limiter first: nothing rendered), and so is one for an unknown model (nothing looked up)."""
    body = {"name": "slow-chat", "scopes": ["t:*"], "requests_per_second": 0.1}  # 1, then 1 per 10 s
    created = client.post(server.url + "/admin/keys", json=body, headers=server.admin_headers)
    assert created.status_code == 201, created.text
    headers = {"Authorization": f"Bearer {created.json()['key']}"}
    chat = {"model": "t:good", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = server.url + "/v1/chat/completions"
    first = client.post(url, json=chat, headers=headers)
    assert first.status_code == 400 and first.json()["error"]["code"] == "chat_template_missing", first.text
    for model in ("t:good", "t:missing"):
        refused = client.post(url, json={**chat, "model": model}, headers=headers)
        assert refused.status_code == 429, (model, refused.text)  # not 400 (rendered) nor 404 (looked up)
        assert refused.json()["error"]["code"] == "rate_limited"


def test_prompt_tokens_count_against_tokens_per_minute(server: ServerProcess, client: httpx.Client) -> None:
    """Finding 6: a key was charged 128 tokens for 128k prompt tokens computed. A 60 tokens/min key
    now pays its 200-token prompt: its balance goes far below zero and the next request waits."""
    body = {"name": "prompts", "scopes": ["t:*"], "tokens_per_minute": 60}
    created = client.post(server.url + "/admin/keys", json=body, headers=server.admin_headers)
    headers = {"Authorization": f"Bearer {created.json()['key']}"}
    generate = {"task_id": "t:good", "input_ids": [5] * 200, "max_new_tokens": 1}
    assert client.post(server.url + "/generate", json=generate, headers=headers).status_code == 200
    deadline = time.monotonic() + 3  # the charge lands just after the answer
    while (
        refused := client.post(server.url + "/generate", json=generate, headers=headers)
    ).status_code == 200:
        assert time.monotonic() < deadline, "the prompt tokens were not charged"
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited", refused.text
    assert int(refused.headers["Retry-After"]) >= 100  # ~140 tokens below zero, refilled at 1 per second


METRICS_TOKEN = "queue-metrics"


@pytest.fixture(scope="module")
def small_queue(
    gpt2_dir: Path, adapter: Adapter, redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("queue") / "data"
    flags = ("--max-queue", "8", "--metrics-token", METRICS_TOKEN)  # keys exist: /metrics needs a token
    with serving_good_task(gpt2_dir, adapter, redis_proc, data_dir, *flags) as proc:
        yield proc


def test_a_request_the_queue_cannot_take_leaves_no_rows(small_queue: ServerProcess) -> None:
    """Was: with the queue nearly full, `n=16` got 429 and left the generations queued before the
    refusal running, with no owner. Now the queue is asked first: 16 generations never fit a queue
    of 8, nothing is queued, and no row is left waiting or running."""
    body = {"model": "t:good", "prompt": [5, 6], "max_tokens": 50, "n": 16, "ignore_eos": True}
    with httpx.Client(timeout=60, headers=small_queue.admin_headers) as client:  # Redis holds keys now
        refused = client.post(small_queue.url + "/v1/completions", json=body)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded", refused.text
        scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        metrics = client.get(small_queue.url + "/metrics", headers=scrape).text
        assert metric_value(metrics, "prefix_server_waiting_requests") == 0
        assert metric_value(metrics, "prefix_server_running_requests") == 0
        assert client.post(small_queue.url + "/v1/completions", json={**body, "n": 8}).status_code == 200


class _Pins:
    """The prefix cache's pin count (start pins the task until its generation ends)."""

    def __init__(self) -> None:
        self.count = 0

    def pin(self, task_id: str) -> None:
        self.count += 1

    def unpin(self, task_id: str) -> None:
        self.count -= 1


def test_start_all_cancels_what_it_queued_when_one_cannot_be_queued(gpt2_dir: Path, tmp_path: Path) -> None:
    """The race the queue check cannot close (others fill the queue while a request is tokenized):
    the engine is held between steps, 2 of a queue of 4 are taken, and 16 generations are started.
    The third raises QueueFull; the two queued before it are cancelled (never run, unpinned)."""
    loaded = load_model(ModelOptions(str(gpt2_dir), "cpu", "float32", tmp_path))
    layout = KVLayout(2, 4, 8, 4, MAX_POSITIONS, torch.float32, torch.device("cpu"))
    finished: list[str] = []

    def on_step(stats: StepStats) -> None:
        finished.extend(f.finish_reason for f in stats.finished)

    engine = Engine(loaded, SlotKVCache(layout), EngineConfig(max_queue=4), on_step=on_step)
    pins = _Pins()
    limits = RequestLimits(64, None, 4, 1 << 20, 1 << 20)
    services = Services(
        engine, cast(PrefixesProtocol, pins), *cast(tuple, (None, "", limits, None, None, None))
    )
    meta = PrefixMeta("t:a", 1, 3, 0, "float32", "fp", "now")
    prefix = PrefixEntry(meta, torch.randn(2, 2, 4, 3, 8))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)

    async def main() -> None:
        engine.start(asyncio.get_running_loop())
        gate = threading.Event()
        held = asyncio.ensure_future(engine.run_on_model(gate.wait))  # no step runs meanwhile
        await asyncio.sleep(0.2)
        fillers = [engine.submit(prefix, [5, 6], params) for _ in range(2)]
        with pytest.raises(QueueFull):
            start_all(services, Caller(None), prefix, [([7, 8], params)] * 16, time.monotonic())
        assert pins.count == 0  # the two it had queued were cancelled
        gate.set()
        await held
        for handle in fillers:
            assert [o.finish_reason async for o in handle][-1] == "length"
        for _ in range(100):
            if engine.stats().num_waiting == engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.05)

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        engine.stop()
    assert finished == ["length", "length"]  # the cancelled ones never ran
