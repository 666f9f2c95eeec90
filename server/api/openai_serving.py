"""What `/v1/completions` and `/v1/chat/completions` share once `launch` has started their
generations: collecting the outputs, answering (off the event loop when large), the one SSE pump,
usage, finish reasons and the token texts and logprobs both formats are made of."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from server.api.deps import EngineProtocol, Services
from server.api.generation import Started
from server.api.json_body import JSONBodyRoute
from server.api.outputs import check_finished, collect, ended_error, interleave, until_disconnect
from server.api.schemas_chat import ChoiceLogprobs, TokenLogprob, TopLogprob
from server.api.schemas_openai import (
    CompletionLogprobs,
    CompletionUsage,
    FinishReason,
    OpenAIErrorDetail,
    StreamError,
    openai_error_responses,
)
from server.engine.request import StepOutput

# answers with more entries (tokens x (1 + logprobs)) are decoded and rendered in a thread: that
# many can take seconds, which the event loop (every other request) must not wait for
OFF_LOOP_TOKENS = 2048


def v1_router() -> APIRouter:
    """A router for `/v1/*`: bodies parsed as every JSON route's, OpenAI's error shapes documented."""
    return APIRouter(
        prefix="/v1",
        route_class=JSONBodyRoute,
        responses=openai_error_responses(400, 401, 403, 404, 413, 429, 503, 504),
    )


def finish_reason(output: StepOutput) -> FinishReason | None:
    """OpenAI's reason: `length`, or `stop` for a stop string and for EOS alike."""
    if output.finish_reason is None:
        return None
    return "length" if output.finish_reason == "length" else "stop"


def usage(num_prompt: int, num_completion: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=num_prompt, completion_tokens=num_completion, total_tokens=num_prompt + num_completion
    )


def num_prompt_tokens(started: Sequence[Started], n: int) -> int:
    """Tokens of every prompt once (`started` is prompt-major: each prompt's `n` choices in a row)."""
    return sum(len(one.prompt_ids) for one in started[::n])


def num_completion_tokens(results: Iterable[list[StepOutput]]) -> int:
    return sum(len(o.token_ids) for outputs in results for o in outputs)


def joined_text(outputs: Iterable[StepOutput]) -> str:
    return "".join(o.text_delta for o in outputs)


class TokenTexts(dict[int, str]):
    """Each token id's text, decoded once per request (an answer repeats ids a lot)."""

    def __init__(self, engine: EngineProtocol) -> None:
        super().__init__()
        self.engine = engine

    def __missing__(self, token_id: int) -> str:
        text = self[token_id] = self.engine.token_text(token_id)
        return text


def completion_logprobs(outputs: list[StepOutput], texts: TokenTexts, offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs object for the chosen tokens (+ top alternatives when asked)."""
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for output in outputs:
        for token_id in output.token_ids:
            text = texts[token_id]
            logprobs.tokens.append(text)
            logprobs.token_logprobs.append(output.logprob)
            logprobs.top_logprobs.append(_top_by_text(output.top_logprobs, texts))
            logprobs.text_offset.append(offset)
            offset += len(text)
    return logprobs


def _top_by_text(
    alternatives: tuple[tuple[int, float], ...] | None, texts: TokenTexts
) -> dict[str, float] | None:
    """Alternatives keyed by text (OpenAI's format); ids that read the same keep the best logprob."""
    if not alternatives:
        return None
    top: dict[str, float] = {}
    for token_id, logprob in alternatives:  # best first
        top.setdefault(texts[token_id], logprob)
    return top


def chat_logprobs(outputs: list[StepOutput], texts: TokenTexts) -> ChoiceLogprobs:
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


async def collect_finished(
    started: Sequence[Started], services: Services, request: Request
) -> list[list[StepOutput]]:
    """Every generation's outputs, once all have ended normally (else the first failure's error)."""
    results = await until_disconnect(request, asyncio.gather(*(collect(s, services) for s in started)))
    for outputs in results:
        check_finished(outputs)
    return results


async def answer(build: Callable[[], BaseModel], num_tokens: int, num_logprobs: int | None) -> Response:
    """The JSON answer `build` makes; built in a thread when it has more than OFF_LOOP_TOKENS entries."""

    def render() -> Response:
        return Response(build().model_dump_json(), media_type="application/json")

    is_big = num_tokens * (1 + (num_logprobs or 0)) > OFF_LOOP_TOKENS
    return await asyncio.to_thread(render) if is_big else render()


def chunk_line(head: BaseModel, choice: BaseModel) -> str:
    """The `data:` line of one choice's chunk: `head` (a completion or chat chunk without choices)
    with `choice`; usage is only ever on the last line."""
    return f"data: {head.model_copy(update={'choices': [choice]}).model_dump_json(exclude={'usage'})}\n\n"


def stream_error(output: StepOutput) -> str | None:
    """The `data:` line of a choice that failed part way, else None."""
    error = ended_error(output)
    if error is None:
        return None
    detail = OpenAIErrorDetail(message=error.message, type="server_error", param=None, code=error.code)
    return f"data: {StreamError(error=detail).model_dump_json()}\n\n"


ChoiceOf = Callable[[int, StepOutput, TokenTexts], BaseModel]


async def sse_pump(
    started: Sequence[Started],
    services: Services,
    head: BaseModel,
    choice_of: ChoiceOf,
    num_prompt: int | None,
    opening: Iterable[str] = (),
) -> AsyncIterator[str]:
    """The stream of either route: `opening` lines, a chunk per output as made (choices
    interleaved; `choice_of` renders one), a usage chunk unless `num_prompt` is None, `[DONE]`."""
    for line in opening:
        yield line
    texts = TokenTexts(services.engine)
    num_completion = 0
    async for index, output in interleave(started, services):
        error = stream_error(output)
        if error is not None:
            yield error
            continue
        num_completion += len(output.token_ids)
        yield chunk_line(head, choice_of(index, output, texts))
    if num_prompt is not None:
        last = head.model_copy(update={"usage": usage(num_prompt, num_completion)})
        yield f"data: {last.model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"
