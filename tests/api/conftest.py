"""A real server process over the tiny GPT-2 and a throwaway Redis, shared by a test module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Adapter


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisProcess]:
    with RedisProcess() as proc:
        yield proc


@contextmanager
def serving_good_task(
    gpt2_dir: Path, adapter: Adapter, redis_proc: RedisProcess, data_dir: Path, *flags: str
) -> Iterator[ServerProcess]:
    """A server over the tiny GPT-2 and `redis_proc`, with task `t:good` uploaded."""
    base = ["--model", str(gpt2_dir), "--redis-url", redis_proc.url]
    with ServerProcess(data_dir, *base, *flags) as proc, httpx.Client(timeout=30) as client:
        assert upload_adapter(client, proc, "t:good", adapter.weights, adapter.config).status_code == 201
        yield proc


@pytest.fixture(scope="module")
def server(
    gpt2_dir: Path, adapter: Adapter, redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Task `t:good` is uploaded; uploads above 2 MiB are refused."""
    data_dir = tmp_path_factory.mktemp("server") / "data"
    with serving_good_task(gpt2_dir, adapter, redis_proc, data_dir, "--max-upload-bytes", str(2**21)) as proc:
        yield proc
