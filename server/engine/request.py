"""Request state and the records the engine hands back."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch-free at run time: server/api imports these records
    import torch

    from prefix_store.entry import PrefixEntry

# abort: the caller left; timeout: over --request-timeout; shutdown: the server stopped before it ended;
# shed: dropped from a full queue to make room for a tenant with fewer waiting requests
FinishReason = Literal["length", "stop", "eos", "abort", "error", "timeout", "shutdown", "shed"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; `temperature == 0` is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    # OpenAI's, over the generated tokens: logit -= count * frequency + (count > 0) * presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # HF's, over prompt + generated tokens: a seen token's logit is divided by it (multiplied if < 0)
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        penalties = (self.frequency_penalty, self.presence_penalty, self.repetition_penalty)
        if not all(math.isfinite(p) for p in penalties) or self.repetition_penalty <= 0:
            raise ValueError(f"penalties must be finite and repetition_penalty > 0, got {penalties}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler must change this row's logits from its token history."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request."""

    request_id: str
    token_ids: list[int]  # new ids this step (one, or none when the row only finished)
    text_delta: str  # new text that is safe to show (stop strings are held back)
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprob: float | None = None  # of the chosen token under the model's distribution
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (token id, logprob), best first


@dataclass(eq=False)  # identity: two requests are never "equal" (and tensors don't compare)
class Request:
    """A generation request as the engine tracks it (mutated only by the engine thread)."""

    prefix: PrefixEntry
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str = ""  # fairness unit of admission (an API key, else the task's namespace)
    request_id: str = field(default_factory=lambda: f"gen-{uuid.uuid4().hex}")  # reveals no volume
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    text: str = ""  # decoded output so far (truncated at a stop string)
    num_sent_chars: int = 0  # how much of `text` was already handed out
    # incremental detokenization: output ids [prefix_offset:read_offset] decode to the text's tail
    # (context for the next decode); ids from read_offset on are not in `text` yet
    prefix_offset: int = 0
    read_offset: int = 0
    num_pending_chars: int = 0  # the end of `text` decoded from ids after read_offset (incomplete)
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    admitted_time: float | None = None  # when it got a KV slot
    first_token_time: float | None = None
    deadline: float | None = None  # monotonic time after which it is cut off (`--request-timeout`)

    @property
    def prefix_len(self) -> int:
        return self.prefix.meta.prefix_len

    @property
    def num_cached(self) -> int:
        """Positions this row has in its slot once its last sampled token is not yet fed."""
        return self.prefix_len + len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
