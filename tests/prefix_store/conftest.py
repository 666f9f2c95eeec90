"""Fixtures for prefix_store tests: one throwaway Redis per module, a fresh namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisProcess


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisProcess]:
    """An in-memory redis-server on a free port, shared by the tests of one module."""
    with RedisProcess() as proc:
        yield proc


@pytest.fixture
def fingerprint() -> str:
    """A model fingerprint no other test uses, so tests sharing `redis_proc` stay isolated."""
    return f"test-{uuid.uuid4().hex}"
