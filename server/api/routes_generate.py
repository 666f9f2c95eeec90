"""`POST /generate`: resolve the task's prefix, tokenize, submit, collect or stream."""

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.api.deps import Services, get_services
from server.api.generation import (
    Started,
    check_finished,
    check_limits,
    collect,
    encode_prompts,
    ended_error,
    outputs_of,
    resolve_prefix,
    start,
    until_disconnect,
)
from server.api.json_body import JSONBodyRoute
from server.api.schemas import GenerateRequest, GenerateResponse, Usage, error_responses, event_stream_too
from server.api.stall import ClosingStreamingResponse
from server.api.tenancy import CallerDep, admit
from server.engine.request import SamplingParams

router = APIRouter(route_class=JSONBodyRoute)


def _params(body: GenerateRequest) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(body.stop),
        ignore_eos=body.ignore_eos,
    )


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **event_stream_too("The generation"),
        **error_responses(401, 403, 404, 413, 422, 429, 503, 504),
    },
)
async def generate(
    body: GenerateRequest,
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    caller: CallerDep,
) -> object:
    arrival = time.monotonic()  # time to first token includes waiting for a cold prefix
    params = _params(body)
    check_limits(services, params)
    await admit(services, caller, body.task_id, max_tokens=body.max_new_tokens)
    prefix = await resolve_prefix(services, body.task_id)
    prompt = body.input_ids if body.input_ids is not None else body.prompt or ""
    [prompt_ids] = await encode_prompts(services.engine, [prompt], body.add_special_tokens)
    started = start(services, caller, prefix, prompt_ids, params, arrival)
    request.state.generations = [started.describe(body.task_id)]
    if body.stream:
        return ClosingStreamingResponse(_sse(started, services), media_type="text/event-stream")
    outputs = await until_disconnect(request, collect(started, services))
    last = check_finished(outputs)
    token_ids = [t for o in outputs for t in o.token_ids]
    return GenerateResponse(
        id=started.handle.request_id,
        task_id=body.task_id,
        prefix_version=prefix.meta.version,
        text="".join(o.text_delta for o in outputs),
        token_ids=token_ids,
        finish_reason=last.finish_reason,  # type: ignore[arg-type]
        usage=Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(token_ids),
            prefix_tokens=prefix.meta.prefix_len,
        ),
    )


async def _sse(started: Started, services: Services) -> AsyncIterator[str]:
    """One `data:` event per token, a final one with finish_reason and usage, then `[DONE]`."""
    prefix = started.prefix
    num_tokens = 0
    async for output in outputs_of(started, services):
        num_tokens += len(output.token_ids)
        event: dict[str, object] = {
            "id": started.handle.request_id,
            "token_ids": output.token_ids,
            "text": output.text_delta,
            "prefix_version": prefix.meta.version,
        }
        if output.finish_reason is not None:
            event["finish_reason"] = output.finish_reason
            event["usage"] = {
                "prompt_tokens": len(started.prompt_ids),
                "completion_tokens": num_tokens,
                "prefix_tokens": prefix.meta.prefix_len,
            }
            error = ended_error(output)
            if error is not None:
                event["error"] = {"code": error.code, "message": error.message}
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"
