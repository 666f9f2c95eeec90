"""Request and response bodies of the public HTTP contract."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from prefix_store.meta import ApiKey, PrefixMeta, ResidentPrefix, TierUsage
from server.tenancy.scopes import SCOPE_PATTERN

Finite = Annotated[float, Field(allow_inf_nan=False)]  # sampling numbers: no inf, no NaN

TASK_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
TaskId = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]
# `fail_fast`: a list stops at its first bad item. Without it, 340,000 bad items make 340,000
# errors, which pydantic and FastAPI take seconds to build, on the event loop.
TokenIds = Annotated[list[int], Field(fail_fast=True)]
MAX_UNKNOWN_FIELDS = 3  # more unknown fields than this get one error, not one each
FREQUENCY_PENALTY = "OpenAI's: each generated token's logit -= this times how often it was generated"
PRESENCE_PENALTY = "OpenAI's: each generated token's logit -= this, once"
REPETITION_PENALTY = (
    "HF's: a logit of a token in the prompt or generated is divided by this (multiplied when negative)"
)
Scope = Annotated[str, StringConstraints(pattern=SCOPE_PATTERN)]


def refuse_many_unknown(model: type[BaseModel], data: Any) -> Any:
    """One error for a body with many unknown fields (a few still get pydantic's error each)."""
    fields = model.model_fields
    if isinstance(data, dict) and len(data) > len(fields) + MAX_UNKNOWN_FIELDS:
        unknown = [name for name in data if name not in fields]
        if len(unknown) > MAX_UNKNOWN_FIELDS:
            names = ", ".join(repr(str(name)[:64]) for name in unknown[:MAX_UNKNOWN_FIELDS])
            raise ValueError(f"{len(unknown)} unknown fields ({names}, ...)")
    return data


class GenerateRequest(BaseModel):
    """`POST /generate`. The upper bound of `max_new_tokens` is the server's `--max-new-tokens`."""

    model_config = ConfigDict(extra="forbid")

    task_id: TaskId
    prompt: str | None = None
    input_ids: TokenIds | None = None
    max_new_tokens: int = Field(64, ge=1)
    temperature: Finite = Field(0.0, ge=0.0)
    top_k: int = Field(0, ge=0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, fail_fast=True)  # how many: --max-stop-strings
    stream: bool = False
    ignore_eos: bool = False
    add_special_tokens: bool = False
    frequency_penalty: Finite = Field(0.0, ge=-2.0, le=2.0, description=FREQUENCY_PENALTY)
    presence_penalty: Finite = Field(0.0, ge=-2.0, le=2.0, description=PRESENCE_PENALTY)
    repetition_penalty: Finite = Field(1.0, gt=0.0, le=2.0, description=REPETITION_PENALTY)

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: Any) -> Any:
        return refuse_many_unknown(cls, data)

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError("send exactly one of `prompt` (text) or `input_ids` (token ids)")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    prefix_tokens: int


class GenerateResponse(BaseModel):
    id: str
    task_id: str
    prefix_version: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage


class ErrorDetail(BaseModel):
    code: str
    message: str


class GenerateEvent(BaseModel):
    """One `data:` event of a streamed `/generate`; the last one has `finish_reason` and `usage`
    (and `error` when the generation failed part way: timeout, shutdown, shed)."""

    id: str
    token_ids: list[int]
    text: str
    prefix_version: int
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ErrorDetail | None = None


class PrefixList(BaseModel):
    items: list[PrefixMeta]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class CacheContents(BaseModel):
    tiers: dict[str, TierUsage] = Field(description="per tier: device (the KV pool), host")
    items: list[ResidentPrefix] = Field(description="least recently used first")


class ErrorBody(BaseModel):
    error: ErrorDetail


_ERRORS = {
    401: "No valid bearer token",
    403: "The token may not do this",
    404: "Unknown task (or key)",
    413: "Body or upload too large",
    422: "Invalid request, context too long, invalid prefix or model mismatch",
    429: "Overloaded or over the key's rate limit (see Retry-After)",
    503: "Store unavailable or draining (see Retry-After)",
    504: "The generation ran past the request timeout",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for our error statuses: `{"error": {"code", "message"}}`. A 422 here
    replaces FastAPI's default `HTTPValidationError`, which is not what we answer."""
    return {status: {"model": ErrorBody, "description": _ERRORS[status]} for status in statuses}


def event_stream_too(description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or `text/event-stream` when the request says `stream: true`."""
    # Open API 3.1: the `schema` of text/event-stream describes one event (`data:` line and all)
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    return {200: {"description": description, "content": {"text/event-stream": {"schema": event}}}}


class KeyCreate(BaseModel):
    """`POST /admin/keys`: a tenant key bound to task ids / `prefix*` patterns, with rate limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    scopes: list[Scope] = Field(min_length=1, max_length=256, description="task ids or `prefix*` patterns")
    requests_per_second: float = Field(0.0, ge=0.0, le=1e6, description="0: unlimited")
    tokens_per_minute: int = Field(0, ge=0, le=10**12, description="generated tokens; 0: unlimited")


class KeyList(BaseModel):
    items: list[ApiKey]
