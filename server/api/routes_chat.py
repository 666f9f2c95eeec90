"""OpenAI-compatible `/v1/chat/completions` over the one generation path: the messages are
rendered by the model's chat template (or `--chat-template`), encoded like a text prompt, and
generated exactly as `/v1/completions` would generate that prompt."""

import time
import uuid

from fastapi import Request, Response

from server.api import openai_serving as serving
from server.api.callers import CallerDep
from server.api.deps import ServicesDep
from server.api.generation import GenerationRequest, launch
from server.api.schemas import event_stream_too
from server.api.schemas_chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
)
from server.api.stall import ClosingStreamingResponse
from server.engine.request import StepOutput

router = serving.v1_router()


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
    num_prompt = serving.num_prompt_tokens(started, body.n)
    head = ChatCompletionChunk(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=[]
    )
    if body.stream:
        roles = [  # each choice's first chunk says who speaks
            serving.chunk_line(
                head, ChatChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))
            )
            for i in range(len(started))
        ]
        num_prompt_shown = num_prompt if body.include_usage else None
        stream = serving.sse_pump(
            started, services, head, _chunk_choices(body.logprobs), num_prompt_shown, roles
        )
        return ClosingStreamingResponse(stream, media_type="text/event-stream")
    results = await serving.collect_finished(started, services, request)
    num_completion = serving.num_completion_tokens(results)

    def build() -> ChatCompletion:
        texts = serving.TokenTexts(services.engine)
        return ChatCompletion(
            id=head.id,
            created=head.created,
            model=body.model,
            choices=[_choice(i, outputs, texts, body.logprobs) for i, outputs in enumerate(results)],
            usage=serving.usage(num_prompt, num_completion),
        )

    return await serving.answer(build, num_completion, body.num_logprobs)


def _choice(
    index: int, outputs: list[StepOutput], texts: serving.TokenTexts, want_logprobs: bool
) -> ChatChoice:
    reason = serving.finish_reason(outputs[-1])
    assert reason is not None  # collect_finished: a normal end
    return ChatChoice(
        index=index,
        message=AssistantMessage(content=serving.joined_text(outputs)),
        logprobs=serving.chat_logprobs(outputs, texts) if want_logprobs else None,
        finish_reason=reason,
    )


def _chunk_choices(want_logprobs: bool) -> serving.ChoiceOf:
    """A stream's choice per output: its text as a delta (and its logprobs when asked)."""

    def choice_of(index: int, output: StepOutput, texts: serving.TokenTexts) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=index,
            delta=ChoiceDelta(content=output.text_delta),
            logprobs=serving.chat_logprobs([output], texts) if want_logprobs else None,
            finish_reason=serving.finish_reason(output),
        )

    return choice_of
