"""Tests of the Python client and the `prefixctl` CLI against a real server process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess

LAYERS, HEADS, HEAD_DIM = 2, 4, 8  # the tiny GPT-2 of tests/conftest.py


# what the clients' chat calls render with (the tiny GPT-2 has no chat template of its own)
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@contextmanager
def running_server(gpt2_dir: Path, data_dir: Path) -> Iterator[ServerProcess]:
    """`prefix-serve --model <tiny GPT-2> --chat-template <CHAT_TEMPLATE>` on a throwaway Redis."""
    data_dir.mkdir(parents=True, exist_ok=True)
    template = data_dir.parent / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    flags = ("--model", str(gpt2_dir), "--chat-template", str(template))
    with (
        RedisProcess() as redis_proc,
        ServerProcess(data_dir, *flags, "--redis-url", redis_proc.url) as server,
    ):
        yield server


def canonical_prefix(prefix_len: int, seed: int = 0) -> bytes:
    """A canonical safetensors prefix `[layers, 2, heads, prefix_len, head_dim]` for the tiny GPT-2."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(LAYERS, 2, HEADS, prefix_len, HEAD_DIM, generator=generator)
    return safetensors.torch.save({"prefix": tensor})
