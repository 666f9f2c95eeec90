"""The soak's workload: the server's limits, the run's options and mix, its tasks, prompts, sampling,
prefixes and the shape of a bad request (the cases themselves: `soak_traffic.bad_cases`)."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

MAX_POSITIONS = 512  # the model's context (and the server's --max-model-len)
MAX_NEW_LIMIT = 64  # the server's --max-new-tokens
MAX_UPLOAD_BYTES = 1 << 20  # the server's --max-upload-bytes
PREFIX_LENS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96)
TENANTS = ("acme", "globex", "initech", "umbrella")
CHURN, PEFT, TEXT = (3, 9, 14), (5, 11), (2, 7, 12)  # task indexes by role / initial kind
MAX_NEW_CHOICES = (4, 8, 16, 32)
NUM_PROMPTS = 24
MIX = {  # relative weights of what a client does next
    "generate": 34,
    "generate_stream": 14,
    "generate_sampled": 6,
    "completions": 8,
    "completions_stream": 6,
    "cancel_stream": 6,
    "cancel_timeout": 4,
    "bad_request": 16,
    "admin_upload": 2,
    "admin_read": 2,
}


# ---- workload ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    duration: float
    clients: int
    warmup: float
    out: Path
    docs: Path | None
    seed: int
    rss_interval: float
    mix: dict[str, int]
    use_keys: bool  # one API key per tenant (scoped `tenant:*`), as a multi-tenant deployment runs


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    prefix_len: int  # of the first version
    kind: str  # tensor | peft | text
    is_churn: bool


@dataclass(frozen=True)
class PromptSpec:
    text: str
    ids: tuple[int, ...]
    max_new: int


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def body(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


GREEDY = Sampling()


def sampled(rng: random.Random) -> Sampling:
    return Sampling(temperature=0.8, top_k=rng.choice((0, 20)), top_p=0.95, seed=rng.randrange(4))


def task_specs() -> list[TaskSpec]:
    def kind(i: int) -> str:
        return "peft" if i in PEFT else "text" if i in TEXT else "tensor"

    return [
        TaskSpec(f"{TENANTS[i % len(TENANTS)]}:t{i:02d}", length, kind(i), i in CHURN)
        for i, length in enumerate(PREFIX_LENS)
    ]


def prompt_specs(tokenizer: Any, rng: random.Random) -> list[PromptSpec]:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8))) for _ in range(64)]
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(NUM_PROMPTS - 2)]
    texts += ["héllo wörld ✓", "?"]  # multi-byte characters and a one-token prompt
    return [
        PromptSpec(t, tuple(tokenizer.encode(t, add_special_tokens=False)), MAX_NEW_CHOICES[i % 4])
        for i, t in enumerate(texts)
    ]


def random_text(rng: random.Random, length: int) -> str:
    """Letters and spaces, never only spaces (a blank text prefix is refused)."""
    return rng.choice(string.ascii_letters) + "".join(rng.choices(string.ascii_letters + " ", k=length - 1))


def canonical_prefix(layout: tuple[int, int, int], length: int, seed: int) -> bytes:
    num_layers, heads, head_dim = layout
    generator = torch.Generator().manual_seed(seed)
    return safetensors.torch.save(
        {"prefix": torch.randn(num_layers, 2, heads, length, head_dim, generator=generator)}
    )


def client_headers() -> dict[str, str]:
    """Headers of every generation request (`/generate`, `/v1/*`); add an API key here when needed."""
    return {"user-agent": "prefix-soak/1"}


@dataclass(frozen=True)
class BadCase:
    name: str
    method: str
    path: str
    status: int
    code: str
    json: Any = None
    content: bytes | None = None
    files: Any = None
    auth: str = "generation"  # generation | admin | none | wrong
