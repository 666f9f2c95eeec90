"""`POST /generate`: resolve the task's prefix, tokenize, submit, collect or stream."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from prefix_store.entry import PrefixEntry
from server.api.deps import RequestHandleProtocol, Services, get_services
from server.api.errors import ApiError
from server.api.schemas import GenerateRequest, GenerateResponse, Usage
from server.engine.request import SamplingParams, StepOutput

router = APIRouter()


def _params(body: GenerateRequest, max_new_tokens: int) -> SamplingParams:
    if body.max_new_tokens > max_new_tokens:
        raise ApiError(422, "invalid_request", f"max_new_tokens must be <= {max_new_tokens}")
    return SamplingParams(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(body.stop),
        ignore_eos=body.ignore_eos,
    )


async def _submit(
    body: GenerateRequest, services: Services
) -> tuple[PrefixEntry, list[int], RequestHandleProtocol]:
    params = _params(body, services.max_new_tokens)
    prefix = await services.prefixes.get(body.task_id)
    if prefix is None:
        raise ApiError(404, "unknown_task", f"no prefix is uploaded for task_id {body.task_id!r}")
    engine = services.engine
    prompt_ids = (
        body.input_ids
        if body.input_ids is not None
        else engine.encode(body.prompt or "", body.add_special_tokens)
    )
    return prefix, prompt_ids, engine.submit(prefix, prompt_ids, params)


async def _watch_disconnect(request: Request, task: "asyncio.Task[object]") -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.25)


async def _collect(handle: RequestHandleProtocol, services: Services, arrival: float) -> list[StepOutput]:
    outputs: list[StepOutput] = []
    async for output in handle:
        if not outputs:
            services.metrics.ttft.observe(time.monotonic() - arrival)
        outputs.append(output)
    return outputs


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest, request: Request, services: Annotated[Services, Depends(get_services)]
) -> object:
    arrival = time.monotonic()
    prefix, prompt_ids, handle = await _submit(body, services)
    if body.stream:
        return StreamingResponse(
            _sse(handle, prefix, prompt_ids, services, arrival), media_type="text/event-stream"
        )
    collecting = asyncio.ensure_future(_collect(handle, services, arrival))
    watcher = asyncio.ensure_future(_watch_disconnect(request, collecting))  # type: ignore[arg-type]
    try:
        outputs = await collecting
    finally:
        watcher.cancel()
    last = outputs[-1]
    if last.error is not None or last.finish_reason not in ("length", "stop", "eos"):
        raise ApiError(500, "generation_failed", last.error or f"generation ended: {last.finish_reason}")
    token_ids = [t for o in outputs for t in o.token_ids]
    return GenerateResponse(
        id=handle.request_id,
        task_id=body.task_id,
        prefix_version=prefix.meta.version,
        text="".join(o.text_delta for o in outputs),
        token_ids=token_ids,
        finish_reason=last.finish_reason,
        usage=Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(token_ids),
            prefix_tokens=prefix.meta.prefix_len,
        ),
    )


async def _sse(
    handle: RequestHandleProtocol,
    prefix: PrefixEntry,
    prompt_ids: list[int],
    services: Services,
    arrival: float,
) -> AsyncIterator[str]:
    """One `data:` event per token, a final one with finish_reason and usage, then `[DONE]`."""
    num_tokens = 0
    async for output in handle:
        if num_tokens == 0:
            services.metrics.ttft.observe(time.monotonic() - arrival)
        num_tokens += len(output.token_ids)
        event: dict[str, object] = {
            "id": handle.request_id,
            "token_ids": output.token_ids,
            "text": output.text_delta,
        }
        if output.finish_reason is not None:
            event["finish_reason"] = output.finish_reason
            event["prefix_version"] = prefix.meta.version
            event["usage"] = {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": num_tokens,
                "prefix_tokens": prefix.meta.prefix_len,
            }
            if output.error is not None:
                event["error"] = {"code": "generation_failed", "message": output.error}
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"
