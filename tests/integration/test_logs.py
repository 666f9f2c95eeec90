"""`--log-format json`: one JSON line per request with its id, task, tokens, latencies and status."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Adapter


def test_json_access_log_has_one_line_per_request(gpt2_dir: Path, adapter: Adapter, tmp_path: Path) -> None:
    with RedisProcess() as redis_proc:
        flags = ["--model", str(gpt2_dir), "--redis-url", redis_proc.url, "--log-format", "json"]
        with ServerProcess(tmp_path / "data", *flags) as server, httpx.Client(timeout=30) as client:
            assert upload_adapter(client, server, "t:log", adapter.weights, adapter.config).status_code == 201
            ok = client.post(
                server.url + "/generate", json={"task_id": "t:log", "input_ids": [5], "max_new_tokens": 3}
            )
            body = {"model": "t:log", "prompt": "hi", "max_tokens": 2, "n": 2, "stream": True}
            with client.stream("POST", server.url + "/v1/completions", json=body) as response:
                list(response.iter_lines())
            assert (
                client.post(
                    server.url + "/generate", json={"task_id": "t:none", "input_ids": [5]}
                ).status_code
                == 404
            )
            client.get(server.url + "/metrics")  # scrapes are not logged
        lines = [json.loads(line) for line in server.log_tail(200_000).splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "prefix_server.access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("PUT", "/admin/prefixes/t:log", 201),
        ("POST", "/generate", 200),
        ("POST", "/v1/completions", 200),
        ("POST", "/generate", 404),
    ]
    generate = access[1]
    assert generate["id"] == ok.json()["id"] and generate["task_id"] == "t:log"
    assert (generate["prompt_tokens"], generate["completion_tokens"], generate["finish_reason"]) == (
        1,
        3,
        "length",
    )
    assert generate["ttft_ms"] > 0 and generate["duration_ms"] >= generate["ttft_ms"]
    assert [g["completion_tokens"] for g in access[2]["generations"]] == [2, 2]
    assert all({"ts", "level", "message"} <= set(line) for line in lines)
