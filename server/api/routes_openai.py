"""OpenAI-compatible `/v1/completions` and `/v1/models` over the one generation path: `model`
names the task."""

import time
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import Path, Query, Request, Response

from prefix_store.meta import PrefixMeta
from server.api import openai_serving as serving
from server.api.callers import Caller, CallerDep, check_scope, list_visible
from server.api.deps import Services, ServicesDep
from server.api.errors import ApiError, unknown_task
from server.api.generation import GenerationRequest, launch
from server.api.schemas import TASK_ID_PATTERN, event_stream_too
from server.api.schemas_openai import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    Model,
    ModelList,
)
from server.api.stall import ClosingStreamingResponse
from server.engine.request import StepOutput

router = serving.v1_router()


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
    num_prompt = serving.num_prompt_tokens(started, body.n)
    head = Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=[])
    if body.stream:
        choice_of = _chunk_choices(len(started), body.logprobs is not None)
        stream = serving.sse_pump(
            started, services, head, choice_of, num_prompt if body.include_usage else None
        )
        return ClosingStreamingResponse(stream, media_type="text/event-stream")
    results = await serving.collect_finished(started, services, request)
    num_completion = serving.num_completion_tokens(results)

    def build() -> Completion:
        texts = serving.TokenTexts(services.engine)
        head.choices = [
            CompletionChoice(
                index=index,
                text=serving.joined_text(outputs),
                logprobs=serving.completion_logprobs(outputs, texts, 0)
                if body.logprobs is not None
                else None,
                finish_reason=serving.finish_reason(outputs[-1]),
            )
            for index, outputs in enumerate(results)
        ]
        head.usage = serving.usage(num_prompt, num_completion)
        return head

    return await serving.answer(build, num_completion, body.logprobs)


def _chunk_choices(num_choices: int, want_logprobs: bool) -> serving.ChoiceOf:
    """A stream's choice per output; each choice's logprobs carry its text offset so far."""
    offsets = [0] * num_choices

    def choice_of(index: int, output: StepOutput, texts: serving.TokenTexts) -> CompletionChoice:
        logprobs = serving.completion_logprobs([output], texts, offsets[index]) if want_logprobs else None
        offsets[index] += len(output.text_delta)
        return CompletionChoice(
            index=index,
            text=output.text_delta,
            logprobs=logprobs,
            finish_reason=serving.finish_reason(output),
        )

    return choice_of


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
        raise unknown_task(model)
    return _model(meta)


async def _take_request_token(services: Services, caller: Caller) -> None:
    """`/v1/models` costs one request from the key's bucket, as a generation does (429 when empty)."""
    if caller.key is None:
        return
    admission = await services.limiter.admit(caller.key)
    if not admission.is_admitted:
        headers = {"Retry-After": str(admission.retry_after_s)}
        raise ApiError(429, "rate_limited", f"API key {caller.key.id} is over its rate limit", headers)
