"""OpenAI-compatible request bodies (`/v1/completions`); `model` is the task_id."""

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.schemas import TaskId


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


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The fields of OpenAI's Completions API we serve; others that change results are refused."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we do not need (e.g. `user` variants)

    model: TaskId
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    user: str | None = None
    ignore_eos: bool = False  # extension
    echo: bool = False
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _supported(self) -> "CompletionRequest":
        unsupported = {
            "echo": self.echo,
            "best_of": self.best_of not in (None, 1, self.n),
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
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
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]
