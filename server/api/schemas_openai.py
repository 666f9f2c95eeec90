"""OpenAI-compatible request bodies (`/v1/completions`); `model` is the task_id."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.schemas import (
    FREQUENCY_PENALTY,
    PRESENCE_PENALTY,
    REPETITION_PENALTY,
    Finite,
    TaskId,
    TokenIds,
)
from server.engine.request import SamplingParams

# Prompts one body may list, whatever --max-prompts says: past this a list is refused before its
# items are validated (a 1 MB body holds 340,000 `[]`, which would take pydantic 0.15 s).
MAX_PROMPTS_IN_BODY = 2048
TextPrompts = Annotated[list[str], Field(fail_fast=True, max_length=MAX_PROMPTS_IN_BODY)]
IdPrompts = Annotated[list[TokenIds], Field(fail_fast=True, max_length=MAX_PROMPTS_IN_BODY)]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for `/v1/*` errors (OpenAI's shape; request validation is 400, as there)."""
    return {status: {"model": OpenAIErrorBody, "description": "OpenAI-shaped error"} for status in statuses}


Stop = str | Annotated[list[str], Field(fail_fast=True)] | None  # OpenAI's: one string or a list


def stop_strings(stop: Stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(BaseModel):
    """The sampling fields `/v1/completions` and `/v1/chat/completions` share (OpenAI's, plus
    vLLM's `top_k`, `repetition_penalty` and `ignore_eos`), and their engine settings."""

    model_config = ConfigDict(extra="ignore")  # clients send fields that do not change results

    model: TaskId
    temperature: Finite = Field(1.0, ge=0.0, le=2.0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    n: int = Field(1, ge=1, le=16)
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Finite = Field(0.0, ge=-2.0, le=2.0, description=PRESENCE_PENALTY)
    frequency_penalty: Finite = Field(0.0, ge=-2.0, le=2.0, description=FREQUENCY_PENALTY)
    repetition_penalty: Finite = Field(1.0, gt=0.0, le=2.0, description=REPETITION_PENALTY)  # extension
    ignore_eos: bool = False  # extension

    @property
    def stops(self) -> tuple[str, ...]:
        return stop_strings(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, choice: int, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's settings for choice `choice` of `n` (seeds differ: the choices must)."""
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=None if self.seed is None else self.seed + choice,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
        )


class CompletionRequest(OpenAISampling):
    """The fields of OpenAI's Completions API we serve; others that change results are refused."""

    prompt: str | TextPrompts | TokenIds | IdPrompts = Field(
        union_mode="left_to_right",  # the first shape that fits; smart mode would try all four
        description="text, token ids, or a list of either; prompts x `n` at most the server's --max-prompts",
    )
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_logit_bias(cls, value: Any) -> Any:
        if value:  # refused before its entries are validated: each bad one would be an error
            raise ValueError("not supported by this server: logit_bias")
        return value

    @model_validator(mode="after")
    def _supported(self) -> "CompletionRequest":
        unsupported = {
            "echo": self.echo,
            "best_of": self.best_of not in (None, 1, self.n),
            "logit_bias": bool(self.logit_bias),
            "suffix": self.suffix is not None,
        }
        refused = [name for name, is_set in unsupported.items() if is_set]
        if refused:
            raise ValueError(f"not supported by this server: {', '.join(refused)}")
        if any(not s for s in self.stops):  # how many: --max-stop-strings
            raise ValueError("stop: strings must be non-empty")
        if not self.prompts:
            raise ValueError("prompt: at least one prompt")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):  # validated: then every item is an int
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


# ---- answers (OpenAI's shapes; what /openapi.json says is what is sent) -------------------------
FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: per chosen token its text, logprob, the top alternatives
    (by text, best logprob kept) and its character offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None  # null on stream chunks before the last


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """The answer of `/v1/completions`, and (with `usage` left out) each of its stream chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class StreamError(BaseModel):
    """A stream chunk in place of a choice's tokens when it failed part way (timeout, shutdown)."""

    error: OpenAIErrorDetail


class Model(BaseModel):
    """A task, as an OpenAI model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
    has_more: bool = Field(description="more tasks follow: ask again with `after` = the last id")
