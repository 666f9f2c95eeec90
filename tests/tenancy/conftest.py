"""A throwaway redis-server per test module (keys flip a server into key mode for good)."""

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisProcess


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisProcess]:
    with RedisProcess() as proc:
        yield proc
