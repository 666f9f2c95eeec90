"""OpenAI's Chat Completions API (`/v1/chat/completions`): `model` is the task_id. Fields that
would change results and that this server cannot honour (tools, images, logit_bias, JSON mode)
are refused with 400 naming the field, never silently ignored."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.schemas_openai import CompletionUsage, FinishReason, OpenAISampling

# Past these a body is refused before its items are validated: pydantic validates every item of a
# list before it checks the list's length, and a 1 MB body holds 35,000 content parts (~70 ms).
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 2048  # in all messages together
MAX_TOP_LOGPROBS = 20  # as OpenAI
_REFUSED = "not supported by this server"


class ContentPart(BaseModel):
    """One part of a message's content; only `text` parts are served."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A message of the conversation. Roles `tool` / `function` and `tool_calls` are refused."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | Annotated[list[ContentPart], Field(fail_fast=True)] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


class ChatCompletionRequest(OpenAISampling):
    """The fields of OpenAI's Chat Completions API this server serves (plus vLLM's `top_k`,
    `repetition_penalty` and `ignore_eos`)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)]
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="default: --max-new-tokens, or what is left of the context if less"
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Any = Field(None, description="refused: function calling is not supported")
    tool_choice: Any = Field(None, description="refused: function calling is not supported")
    functions: Any = Field(None, description="refused: function calling is not supported")
    function_call: Any = Field(None, description="refused: function calling is not supported")
    logit_bias: Any = Field(None, description="refused")
    response_format: Any = Field(None, description='only {"type": "text"}')

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        messages = data.get("messages") if isinstance(data, dict) else None
        if isinstance(messages, list):
            if len(messages) > MAX_MESSAGES:
                raise ValueError(f"messages: {len(messages)} messages; at most {MAX_MESSAGES}")
            contents = (m.get("content") for m in messages if isinstance(m, dict))
            num_parts = sum(len(c) for c in contents if isinstance(c, list))
            if num_parts > MAX_CONTENT_PARTS:
                raise ValueError(f"messages: {num_parts} content parts; at most {MAX_CONTENT_PARTS} in all")
        return data

    @field_validator("tools", "tool_choice", "functions", "function_call", mode="before")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if value is not None:  # checked before its contents: a long tool list is not validated
            raise ValueError(f"{_REFUSED}: function calling (tools)")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_logit_bias(cls, value: Any) -> Any:
        if value:
            raise ValueError(f"{_REFUSED}: logit_bias")
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is not None and value != {"type": "text"}:
            raise ValueError(f'{_REFUSED}: only {{"type": "text"}}')
        return value

    @field_validator("messages")
    @classmethod
    def _servable(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if message.role not in ("system", "developer", "user", "assistant"):
                raise ValueError(
                    f"{where}.role {message.role[:32]!r}: expected system, developer, user or assistant"
                )
            if message.tool_calls or message.function_call is not None:
                raise ValueError(f"{where}.tool_calls: {_REFUSED}: function calling (tools)")
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                if part.type != "text" or part.text is None:
                    kind = "images" if "image" in part.type else f"{part.type[:32]!r} parts"
                    raise ValueError(f"{where}.content[{j}]: {_REFUSED}: {kind} (text parts only)")
        return messages

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        if any(not s for s in self.stops):  # how many: --max-stop-strings
            raise ValueError("stop: strings must be non-empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """The engine's `logprobs` setting: None when off, else the number of alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as chat templates take them: `role` and `content` text (text parts joined);
        `developer` is OpenAI's newer name for `system`, which is what templates know."""
        rendered = []
        for message in self.messages:
            content = message.content
            text = "".join(p.text or "" for p in content) if isinstance(content, list) else content or ""
            one = {"role": "system" if message.role == "developer" else message.role, "content": text}
            if message.name is not None:
                one["name"] = message.name
            rendered.append(one)
        return rendered


# ---- answers (OpenAI's shapes; what /openapi.json says is what is sent) -------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A chosen token: its text, logprob (of the model's raw distribution) and the alternatives."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """The answer of `/v1/chat/completions` without `stream`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a streamed answer: a choice's first chunk carries the role, then its text
    as made; with `stream_options.include_usage` a last chunk has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None
