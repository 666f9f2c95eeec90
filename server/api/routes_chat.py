"""OpenAI-compatible `/v1/chat/completions` over the one generation path: the messages are
rendered by the model's chat template (or `--chat-template`), encoded like a text prompt, and
generated exactly as `/v1/completions` would generate that prompt."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from server.api.callers import CallerDep
from server.api.deps import Services, ServicesDep
from server.api.generation import (
    GenerationRequest,
    Started,
    check_finished,
    collect,
    interleave,
    launch,
    until_disconnect,
)
from server.api.json_body import JSONBodyRoute
from server.api.routes_openai import TokenTexts, finish_reason, stream_error, usage
from server.api.schemas import event_stream_too
from server.api.schemas_chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
)
from server.api.schemas_openai import openai_error_responses
from server.api.stall import ClosingStreamingResponse
from server.engine.request import StepOutput

router = APIRouter(
    prefix="/v1",
    route_class=JSONBodyRoute,
    responses=openai_error_responses(400, 401, 403, 404, 413, 429, 503, 504),
)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=event_stream_too(
        "The chat completion; with `stream: true`, one `ChatCompletionChunk` per `data:` line"
    ),
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: ServicesDep, caller: CallerDep
) -> ChatCompletion | Response:
    arrival = time.monotonic()
    asked_max = body.max_completion_tokens or body.max_tokens
    # without max_tokens: what the context leaves after the prefix and the rendered prompt
    max_tokens = asked_max or services.limits.max_new_tokens
    choices = [body.sampling(j, max_tokens, body.num_logprobs) for j in range(body.n)]
    messages = body.template_messages()
    asked = GenerationRequest(body.model, [], choices, messages=messages, fills_context=asked_max is None)
    started = await launch(services, caller, asked, request, arrival)
    prompt_ids = started[0].prompt_ids
    head = ChatCompletionChunk(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=[]
    )
    if body.stream:
        stream = _stream(started, services, head, body.include_usage, body.logprobs)
        return ClosingStreamingResponse(stream, media_type="text/event-stream")
    results = await until_disconnect(request, asyncio.gather(*(collect(s, services) for s in started)))
    for outputs in results:
        check_finished(outputs)
    num_completion = sum(len(o.token_ids) for outputs in results for o in outputs)

    def answer() -> Response:
        texts = TokenTexts(services.engine)
        completion = ChatCompletion(
            id=head.id,
            created=head.created,
            model=body.model,
            choices=[_choice(i, outputs, texts, body.logprobs) for i, outputs in enumerate(results)],
            usage=usage(len(prompt_ids), num_completion),
        )
        return Response(completion.model_dump_json(), media_type="application/json")

    is_big = num_completion * (1 + (body.top_logprobs or 0)) > 2048  # rendering that many: off the loop
    return await asyncio.to_thread(answer) if is_big else answer()


def _choice(index: int, outputs: list[StepOutput], texts: TokenTexts, want_logprobs: bool) -> ChatChoice:
    reason = finish_reason(outputs[-1])
    assert reason is not None  # check_finished: a normal end
    return ChatChoice(
        index=index,
        message=AssistantMessage(content="".join(o.text_delta for o in outputs)),
        logprobs=_logprobs(outputs, texts) if want_logprobs else None,
        finish_reason=reason,
    )


def _logprobs(outputs: list[StepOutput], texts: TokenTexts) -> ChoiceLogprobs:
    """OpenAI's chat logprobs: per chosen token its text, bytes, logprob and the alternatives."""

    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = texts[token_id]
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for output in outputs:
        for token_id in output.token_ids:
            chosen = entry(token_id, output.logprob if output.logprob is not None else 0.0)
            top = [entry(t, lp) for t, lp in output.top_logprobs or ()]
            content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChoiceLogprobs(content=content)


async def _stream(
    started: list[Started],
    services: Services,
    head: ChatCompletionChunk,
    include_usage: bool,
    want_logprobs: bool,
) -> AsyncIterator[str]:
    """Each choice's role chunk, then chunks as tokens are made (choices interleaved), an optional
    usage chunk, `[DONE]`."""

    def chunk(choice: ChatChunkChoice) -> str:
        return f"data: {head.model_copy(update={'choices': [choice]}).model_dump_json(exclude={'usage'})}\n\n"

    for index in range(len(started)):
        yield chunk(ChatChunkChoice(index=index, delta=ChoiceDelta(role="assistant", content="")))
    texts = TokenTexts(services.engine)
    num_completion = 0
    async for index, output in interleave(started, services):
        error = stream_error(output)
        if error is not None:
            yield error
            continue
        num_completion += len(output.token_ids)
        logprobs = _logprobs([output], texts) if want_logprobs else None
        delta = ChoiceDelta(content=output.text_delta)
        yield chunk(
            ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason(output))
        )
    if include_usage:
        last = head.model_copy(update={"usage": usage(len(started[0].prompt_ids), num_completion)})
        yield f"data: {last.model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"
