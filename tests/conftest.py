"""Session-wide fixtures: a tiny GPT-2 saved once, and a PEFT adapter for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import Adapter, save_adapter, save_tiny_model


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="session")
def adapter(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Adapter:
    return save_adapter(gpt2_dir, tmp_path_factory.mktemp("adapter") / "a", 4, seed=3)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c
