"""`POST /generate`: the server's own format over the one generation path."""

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from server.api.callers import CallerDep
from server.api.deps import Services, ServicesDep
from server.api.generation import GenerationRequest, Started, launch
from server.api.json_body import JSONBodyRoute
from server.api.outputs import check_finished, collect, ended_error, outputs_of, until_disconnect
from server.api.schemas import (
    ErrorDetail,
    GenerateEvent,
    GenerateRequest,
    GenerateResponse,
    Usage,
    error_responses,
    event_stream_too,
)
from server.api.stall import ClosingStreamingResponse
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
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
    )


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **event_stream_too("The generation; with `stream: true`, one `GenerateEvent` per `data:` line"),
        **error_responses(401, 403, 404, 413, 422, 429, 503, 504),
    },
)
async def generate(
    body: GenerateRequest, request: Request, services: ServicesDep, caller: CallerDep
) -> GenerateResponse | Response:
    arrival = time.monotonic()  # time to first token includes waiting for a cold prefix
    prompt = body.input_ids if body.input_ids is not None else body.prompt or ""
    asked = GenerationRequest(body.task_id, [prompt], [_params(body)], body.add_special_tokens)
    [started] = await launch(services, caller, asked, request, arrival)
    if body.stream:
        return ClosingStreamingResponse(_sse(started, services), media_type="text/event-stream")
    outputs = await until_disconnect(request, collect(started, services))
    last = check_finished(outputs)
    token_ids = [t for o in outputs for t in o.token_ids]
    return GenerateResponse(
        id=started.handle.request_id,
        task_id=body.task_id,
        prefix_version=started.prefix.meta.version,
        text="".join(o.text_delta for o in outputs),
        token_ids=token_ids,
        finish_reason=last.finish_reason,  # type: ignore[arg-type]  # check_finished: a normal end
        usage=_usage(started, len(token_ids)),
    )


def _usage(started: Started, num_completion: int) -> Usage:
    return Usage(
        prompt_tokens=len(started.prompt_ids),
        completion_tokens=num_completion,
        prefix_tokens=started.prefix.meta.prefix_len,
    )


async def _sse(started: Started, services: Services) -> AsyncIterator[str]:
    """One `data:` event per token, a final one with finish_reason and usage, then `[DONE]`."""
    num_tokens = 0
    async for output in outputs_of(started, services):
        num_tokens += len(output.token_ids)
        event = GenerateEvent(
            id=started.handle.request_id,
            token_ids=output.token_ids,
            text=output.text_delta,
            prefix_version=started.prefix.meta.version,
        )
        if output.finish_reason is not None:
            event.finish_reason = output.finish_reason
            event.usage = _usage(started, num_tokens)
            error = ended_error(output)
            if error is not None:
                event.error = ErrorDetail(code=error.code, message=error.message)
        yield f"data: {event.model_dump_json(exclude_none=True)}\n\n"
    yield "data: [DONE]\n\n"
