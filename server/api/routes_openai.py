"""OpenAI-compatible `/v1/completions` and `/v1/models` over the one generation path: `model`
names the task."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from prefix_store.meta import PrefixMeta
from server.api.callers import Caller, CallerDep, check_scope, list_visible
from server.api.deps import EngineProtocol, Services, ServicesDep
from server.api.errors import ApiError
from server.api.generation import (
    GenerationRequest,
    Started,
    check_finished,
    collect,
    ended_error,
    interleave,
    launch,
    until_disconnect,
)
from server.api.json_body import JSONBodyRoute
from server.api.schemas import TASK_ID_PATTERN, event_stream_too
from server.api.schemas_openai import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    FinishReason,
    Model,
    ModelList,
    OpenAIErrorDetail,
    StreamError,
    openai_error_responses,
)
from server.api.stall import ClosingStreamingResponse
from server.engine.request import StepOutput

router = APIRouter(
    prefix="/v1",
    route_class=JSONBodyRoute,
    responses=openai_error_responses(400, 401, 403, 404, 413, 429, 503, 504),
)
OFF_LOOP_TOKENS = 2048  # answers with more entries (tokens x (1 + logprobs)) are built in a thread


def finish_reason(output: StepOutput) -> FinishReason | None:
    """OpenAI's reason: `length`, or `stop` for a stop string and for EOS alike."""
    if output.finish_reason is None:
        return None
    return "length" if output.finish_reason == "length" else "stop"


class TokenTexts(dict[int, str]):
    """Each token id's text, decoded once per request (an answer repeats ids a lot)."""

    def __init__(self, engine: EngineProtocol) -> None:
        super().__init__()
        self.engine = engine

    def __missing__(self, token_id: int) -> str:
        text = self[token_id] = self.engine.token_text(token_id)
        return text


def _logprobs(outputs: list[StepOutput], texts: TokenTexts, offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs object for the chosen tokens (+ top alternatives when asked)."""
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for output in outputs:
        for token_id in output.token_ids:
            text = texts[token_id]
            logprobs.tokens.append(text)
            logprobs.token_logprobs.append(output.logprob)
            logprobs.top_logprobs.append(top_by_text(output.top_logprobs, texts))
            logprobs.text_offset.append(offset)
            offset += len(text)
    return logprobs


def top_by_text(
    alternatives: tuple[tuple[int, float], ...] | None, texts: TokenTexts
) -> dict[str, float] | None:
    """Alternatives keyed by text (OpenAI's format); ids that read the same keep the best logprob."""
    if not alternatives:
        return None
    top: dict[str, float] = {}
    for token_id, logprob in alternatives:  # best first
        top.setdefault(texts[token_id], logprob)
    return top


def usage(num_prompt: int, num_completion: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=num_prompt, completion_tokens=num_completion, total_tokens=num_prompt + num_completion
    )


def json_response(answer: Completion) -> Response:
    return Response(answer.model_dump_json(), media_type="application/json")


@router.post(
    "/completions",
    response_model=Completion,
    responses=event_stream_too(
        "The completion; with `stream: true`, one `Completion` chunk per `data:` line"
    ),
)
async def completions(
    body: CompletionRequest, request: Request, services: ServicesDep, caller: CallerDep
) -> Completion | Response:
    arrival = time.monotonic()
    choices = [body.sampling(j, body.max_tokens, body.logprobs) for j in range(body.n)]
    started = await launch(
        services, caller, GenerationRequest(body.model, body.prompts, choices), request, arrival
    )
    num_prompt = sum(len(one.prompt_ids) for one in started[:: body.n])
    head = Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=[])
    if body.stream:
        stream = _stream(started, services, head, num_prompt, body.include_usage, body.logprobs is not None)
        return ClosingStreamingResponse(stream, media_type="text/event-stream")
    results = await until_disconnect(request, asyncio.gather(*(collect(s, services) for s in started)))
    for outputs in results:
        check_finished(outputs)
    num_completion = sum(len(o.token_ids) for outputs in results for o in outputs)

    def answer() -> Response:
        texts = TokenTexts(services.engine)
        for index, outputs in enumerate(results):
            logprobs = _logprobs(outputs, texts, 0) if body.logprobs is not None else None
            text = "".join(o.text_delta for o in outputs)
            head.choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs))
            head.choices[-1].finish_reason = finish_reason(outputs[-1])
        head.usage = usage(num_prompt, num_completion)
        return json_response(head)

    # decoding and rendering n x max_tokens x logprobs entries can take seconds: not on the event loop
    is_big = num_completion * (1 + (body.logprobs or 0)) > OFF_LOOP_TOKENS
    return await asyncio.to_thread(answer) if is_big else answer()


def stream_error(output: StepOutput) -> str | None:
    """The `data:` line of a choice that failed part way, else None."""
    error = ended_error(output)
    if error is None:
        return None
    detail = OpenAIErrorDetail(message=error.message, type="server_error", param=None, code=error.code)
    return f"data: {StreamError(error=detail).model_dump_json()}\n\n"


async def _stream(
    started: list[Started],
    services: Services,
    head: Completion,
    num_prompt: int,
    include_usage: bool,
    want_logprobs: bool,
) -> AsyncIterator[str]:
    """Chunks as tokens are made, choices interleaved; an optional usage chunk; `[DONE]`."""
    offsets = [0] * len(started)
    texts = TokenTexts(services.engine)
    num_completion = 0
    async for index, output in interleave(started, services):
        error = stream_error(output)
        if error is not None:
            yield error
            continue
        num_completion += len(output.token_ids)
        logprobs = _logprobs([output], texts, offsets[index]) if want_logprobs else None
        offsets[index] += len(output.text_delta)
        choice = CompletionChoice(
            index=index, text=output.text_delta, logprobs=logprobs, finish_reason=finish_reason(output)
        )
        chunk = head.model_copy(update={"choices": [choice]})
        yield f"data: {chunk.model_dump_json(exclude={'usage'})}\n\n"
    if include_usage:
        chunk = head.model_copy(update={"usage": usage(num_prompt, num_completion)})
        yield f"data: {chunk.model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def _model(meta: PrefixMeta) -> Model:
    created = datetime.fromisoformat(meta.created_at.replace("Z", "+00:00"))
    owner = meta.task_id.split(":", 1)[0] if ":" in meta.task_id else "prefix-server"
    return Model(id=meta.task_id, created=int(created.timestamp()), owned_by=owner)


@router.get("/models")
async def list_models(
    services: ServicesDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    after: Annotated[str | None, Query(pattern=TASK_ID_PATTERN)] = None,
) -> ModelList:
    """The tasks the caller may use, as OpenAI models; page with `after` = the last id while `has_more`."""
    await _take_request_token(services, caller)
    items, has_more = await list_visible(services, caller, limit, after)
    return ModelList(data=[_model(m) for m in items], has_more=has_more)


@router.get("/models/{model}")
async def get_model(
    model: Annotated[str, Path(pattern=TASK_ID_PATTERN)], services: ServicesDep, caller: CallerDep
) -> Model:
    check_scope(caller, model)
    await _take_request_token(services, caller)
    meta = await services.prefixes.get_meta(model)
    if meta is None:
        raise ApiError(404, "unknown_task", f"no prefix is uploaded for model (task_id) {model!r}")
    return _model(meta)


async def _take_request_token(services: Services, caller: Caller) -> None:
    """`/v1/models` costs one request from the key's bucket, as a generation does (429 when empty)."""
    if caller.key is None:
        return
    admission = await services.limiter.admit(caller.key)
    if not admission.is_admitted:
        headers = {"Retry-After": str(admission.retry_after_s)}
        raise ApiError(429, "rate_limited", f"API key {caller.key.id} is over its rate limit", headers)
