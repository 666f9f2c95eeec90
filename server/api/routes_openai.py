"""OpenAI-compatible `/v1/completions` and `/v1/models`: `model` names the task."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from prefix_store.entry import PrefixMeta
from server.api.deps import EngineProtocol, Services, get_services
from server.api.errors import ApiError
from server.api.generation import (
    Started,
    check_finished,
    check_limits,
    check_num_prompts,
    collect,
    encode_prompts,
    ended_error,
    outputs_of,
    resolve_prefix,
    start,
    until_disconnect,
)
from server.api.json_body import JSONBodyRoute
from server.api.schemas import TASK_ID_PATTERN, event_stream_too
from server.api.schemas_openai import CompletionRequest, openai_error_responses
from server.api.stall import ClosingStreamingResponse
from server.api.tenancy import Caller, CallerDep, admit, check_scope, list_visible
from server.engine.request import SamplingParams, StepOutput

router = APIRouter(
    prefix="/v1",
    route_class=JSONBodyRoute,
    responses=openai_error_responses(400, 401, 403, 404, 413, 429, 503, 504),
)
ServicesDep = Annotated[Services, Depends(get_services)]
OFF_LOOP_TOKENS = 2048  # answers with more entries (tokens x (1 + logprobs)) are built in a thread


def _params(body: CompletionRequest, choice: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=body.max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=None if body.seed is None else body.seed + choice,  # n choices must differ
        stop=body.stops,
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
    )


def _finish_reason(output: StepOutput) -> str | None:
    if output.finish_reason is None:
        return None
    return "length" if output.finish_reason == "length" else "stop"


class _TokenTexts(dict[int, str]):
    """Each token id's text, decoded once per request (an answer repeats ids a lot)."""

    def __init__(self, engine: EngineProtocol) -> None:
        super().__init__()
        self.engine = engine

    def __missing__(self, token_id: int) -> str:
        text = self[token_id] = self.engine.token_text(token_id)
        return text


def _logprobs(outputs: list[StepOutput], texts: _TokenTexts, offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for the chosen tokens (+ top alternatives when asked)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for output in outputs:
        for token_id in output.token_ids:
            text = texts[token_id]
            tokens.append(text)
            token_logprobs.append(output.logprob)
            top.append(_top_dict(output.top_logprobs, texts))
            offsets.append(offset)
            offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _top_dict(
    alternatives: tuple[tuple[int, float], ...] | None, texts: _TokenTexts
) -> dict[str, float] | None:
    """Alternatives keyed by text (OpenAI's format); ids that read the same keep the best logprob."""
    if not alternatives:
        return None
    top: dict[str, float] = {}
    for token_id, logprob in alternatives:  # best first
        top.setdefault(texts[token_id], logprob)
    return top


async def _start_all(
    body: CompletionRequest, services: Services, caller: Caller, prefix: Any, arrival: float
) -> tuple[list[Started], int]:
    """One engine request per (prompt, choice); returns them and the prompt token count."""
    prompts = await encode_prompts(services.engine, body.prompts, False)
    started: list[Started] = []
    try:
        for ids in prompts:
            started += [
                start(services, caller, prefix, ids, _params(body, j), arrival) for j in range(body.n)
            ]
    except BaseException:
        for s in started:
            s.handle.cancel()
        raise
    return started, sum(len(ids) for ids in prompts)


@router.post("/completions", responses=event_stream_too("The completion"))
async def completions(
    body: CompletionRequest, request: Request, services: ServicesDep, caller: CallerDep
) -> object:
    arrival = time.monotonic()
    check_limits(services, _params(body, 0))
    check_num_prompts(services, len(body.prompts), body.n)
    await admit(services, caller, body.model, max_tokens=body.max_tokens * body.n * len(body.prompts))
    prefix = await resolve_prefix(services, body.model)
    started, num_prompt_tokens = await _start_all(body, services, caller, prefix, arrival)
    request.state.generations = [s.describe(body.model) for s in started]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
    head["model"] = body.model
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = _stream(started, services, head, num_prompt_tokens, include_usage, body.logprobs is not None)
        return ClosingStreamingResponse(stream, media_type="text/event-stream")
    results = await until_disconnect(request, asyncio.gather(*(collect(s, services) for s in started)))
    for outputs in results:
        check_finished(outputs)
    num_completion = sum(len(o.token_ids) for outputs in results for o in outputs)

    def answer() -> JSONResponse:
        texts = _TokenTexts(services.engine)
        choices = []
        for index, outputs in enumerate(results):
            logprobs = _logprobs(outputs, texts, 0) if body.logprobs is not None else None
            text = "".join(o.text_delta for o in outputs)
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": _finish_reason(outputs[-1]),
                }
            )
        return JSONResponse({**head, "choices": choices, "usage": _usage(num_prompt_tokens, num_completion)})

    # decoding and rendering n x max_tokens x logprobs entries can take seconds: not on the event loop
    is_big = num_completion * (1 + (body.logprobs or 0)) > OFF_LOOP_TOKENS
    return await asyncio.to_thread(answer) if is_big else answer()


def _usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }


async def _stream(
    started: list[Started],
    services: Services,
    head: dict[str, Any],
    num_prompt_tokens: int,
    include_usage: bool,
    want_logprobs: bool,
) -> AsyncIterator[str]:
    """Chunks as tokens are made, choices interleaved; an optional usage chunk; `[DONE]`."""
    queue: asyncio.Queue[tuple[int, StepOutput | None]] = asyncio.Queue()
    # Pumps wait while this many chunks are unwritten: a client that stops reading leaves the
    # outputs in the handles, whose rows then pause (see engine.handle.PAUSE_AT).
    room = asyncio.Semaphore(2 * len(started))

    async def pump(index: int, one: Started) -> None:
        try:
            async for output in outputs_of(one, services):
                await room.acquire()
                queue.put_nowait((index, output))
        finally:
            queue.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(started)]
    offsets = [0] * len(started)
    texts = _TokenTexts(services.engine)
    num_completion = 0
    try:
        remaining = len(started)
        while remaining:
            index, output = await queue.get()
            if output is not None:
                room.release()
            if output is None:
                remaining -= 1
                continue
            error = ended_error(output)
            if error is not None:
                body = {"message": error.message, "type": "server_error", "code": error.code}
                yield f"data: {json.dumps({'error': body})}\n\n"
                continue
            num_completion += len(output.token_ids)
            logprobs = _logprobs([output], texts, offsets[index]) if want_logprobs else None
            offsets[index] += len(output.text_delta)
            choice = {"index": index, "text": output.text_delta, "logprobs": logprobs}
            choice["finish_reason"] = _finish_reason(output)
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        if include_usage:
            usage = _usage(num_prompt_tokens, num_completion)
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:  # the client left early: abort every choice
            task.cancel()


def _model(meta: PrefixMeta) -> dict[str, Any]:
    created = datetime.fromisoformat(meta.created_at.replace("Z", "+00:00"))
    owner = meta.task_id.split(":", 1)[0] if ":" in meta.task_id else "prefix-server"
    return {"id": meta.task_id, "object": "model", "created": int(created.timestamp()), "owned_by": owner}


@router.get("/models")
async def list_models(
    services: ServicesDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    after: Annotated[str | None, Query(pattern=TASK_ID_PATTERN)] = None,
) -> object:
    """The tasks the caller may use, as OpenAI models; page with `after` = the last id while `has_more`."""
    await _take_request_token(services, caller)
    items, has_more = await list_visible(services, caller, limit, after)
    return {"object": "list", "data": [_model(m) for m in items], "has_more": has_more}


@router.get("/models/{model}")
async def get_model(
    model: Annotated[str, Path(pattern=TASK_ID_PATTERN)], services: ServicesDep, caller: CallerDep
) -> object:
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
