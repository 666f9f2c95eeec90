"""The one generation path of every route (`/generate`, `/v1/completions`, `/v1/chat/completions`):
`launch` (limits -> admit -> resolve the prefix -> tokenize -> submit); then `server.api.outputs`
reads each generation as the engine makes it. Routes only translate their formats to and from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from server.api.background import in_background
from server.api.callers import Caller, admit, check_scope
from server.api.deps import RequestHandleProtocol, Services
from server.api.errors import ApiError, unknown_task
from server.api.prompts import Messages, check_prompt_chars, encode_prompts, num_chars_of
from server.engine.errors import QueueFull
from server.engine.request import SamplingParams

if TYPE_CHECKING:
    from prefix_store.entry import PrefixEntry


@dataclass(frozen=True)
class Started:
    """A submitted generation: the prefix version it runs on, its prompt, its output stream."""

    prefix: PrefixEntry
    prompt_ids: list[int]
    handle: RequestHandleProtocol
    arrival: float
    caller: Caller
    summary: dict[str, object] = field(default_factory=dict)  # filled as it runs; logged per request

    def describe(self, task_id: str) -> dict[str, object]:
        """The access-log fields of this generation (the dict keeps filling in until it ends)."""
        self.summary.update(
            id=self.handle.request_id,
            task_id=task_id,
            prefix_version=self.prefix.meta.version,
            prompt_tokens=len(self.prompt_ids),
        )
        if self.caller.key is not None:
            self.summary["key_id"] = self.caller.key.id  # which tenant, never the secret
        return self.summary


@dataclass(frozen=True)
class GenerationRequest:
    """What a route asks for, whatever its HTTP shape: every prompt is generated once per
    entry of `choices` (OpenAI's `n`: the same settings with different seeds). A chat sends its
    `messages` instead of prompts: the chat template renders them into the one prompt once the
    request is admitted; with `fills_context`, each choice's `max_new_tokens` is only a ceiling and
    what the context leaves after the prefix and the rendered prompt is generated at most."""

    task_id: str
    prompts: Sequence[str | list[int]]
    choices: Sequence[SamplingParams]
    add_special_tokens: bool = False
    messages: Messages | None = None
    fills_context: bool = False

    @property
    def num_prompts(self) -> int:
        return 1 if self.messages is not None else len(self.prompts)

    @property
    def max_tokens(self) -> int:
        """The most the request may generate in all, held from the caller's token quota at
        admission (a request that fills the context holds its part once the prompt is known)."""
        return 0 if self.fills_context else self.num_prompts * sum(p.max_new_tokens for p in self.choices)


async def launch(
    services: Services, caller: Caller, request: GenerationRequest, http: Request, arrival: float
) -> list[Started]:
    """Check, admit, resolve, tokenize and submit every generation of `request`, prompt-major
    (prompt 0's choices first). Nothing is rendered, tokenized or looked up for a request the
    queue or the rate limiter refuses. All or nothing: if one cannot start, none runs."""
    check_request(services, request)
    check_scope(caller, request.task_id)
    num_generations = request.num_prompts * len(request.choices)
    if not services.engine.has_room(num_generations, request.task_id, caller.tenant):
        raise QueueFull(f"the queue cannot take {num_generations} more requests now")
    await admit(services, caller, request.task_id, max_tokens=request.max_tokens)
    prefix = await resolve_prefix(services, request.task_id)
    prompts = await encode_prompts(
        services.engine, request.prompts, request.add_special_tokens, request.messages
    )
    choices = list(request.choices)
    if request.fills_context:
        choices = fill_context(services, choices, prefix.meta.prefix_len, prompts[0])
        await admit(
            services, caller, request.task_id, sum(p.max_new_tokens for p in choices), take_request=False
        )
    started = start_all(
        services, caller, prefix, [(ids, params) for ids in prompts for params in choices], arrival
    )
    if caller.key is not None:  # prompt tokens weigh as generated ones; charged once queued, not held
        in_background(services.limiter.charge(caller.key, sum(len(one.prompt_ids) for one in started)))
    http.state.generations = [one.describe(request.task_id) for one in started]
    return started


def check_request(services: Services, request: GenerationRequest) -> None:
    """Everything about a request that needs no work: limits, prompt counts and lengths (ids, and
    text by its characters). Raises the 4xx."""
    for params in request.choices:
        check_limits(services, params)
    check_num_prompts(services, request.num_prompts, len(request.choices))
    check_prompt_chars(services, num_chars_of(request.prompts, request.messages))
    for prompt in request.prompts:
        if not isinstance(prompt, str):
            check_prompt(services, prompt)


def fill_context(
    services: Services, choices: list[SamplingParams], prefix_len: int, prompt_ids: list[int]
) -> list[SamplingParams]:
    """Each choice's max tokens: its ceiling, or what the context leaves (at least 1: the engine
    answers a prompt that fills the context with context_too_long)."""
    room = services.engine.stats().max_len - prefix_len - len(prompt_ids)
    return [dataclasses.replace(p, max_new_tokens=max(1, min(p.max_new_tokens, room))) for p in choices]


def start_all(
    services: Services,
    caller: Caller,
    prefix: PrefixEntry,
    generations: list[tuple[list[int], SamplingParams]],
    arrival: float,
) -> list[Started]:
    """Submit every generation, or none: when one cannot be queued (full queue, bad prompt), the
    ones already queued are cancelled before the error goes up."""
    started: list[Started] = []
    try:
        for prompt_ids, params in generations:
            started.append(start(services, caller, prefix, prompt_ids, params, arrival))
    except BaseException:
        for one in started:
            one.handle.cancel()
        raise
    return started


def check_limits(services: Services, params: SamplingParams) -> None:
    """Server limits on a request, checked before anything is loaded or computed."""
    limits = services.limits
    if params.max_new_tokens > limits.max_new_tokens:
        raise ApiError(422, "invalid_request", f"max_new_tokens must be <= {limits.max_new_tokens}")
    if len(params.stop) > limits.max_stop_strings:
        raise ApiError(
            422, "invalid_request", f"at most {limits.max_stop_strings} stop strings; got {len(params.stop)}"
        )


def check_num_prompts(services: Services, num_prompts: int, n: int) -> None:
    """`--max-prompts`: generations (prompts x n) one request may start, checked before tokenizing."""
    limit = services.limits.max_prompts
    if num_prompts * n > limit:
        raise ApiError(
            422,
            "invalid_request",
            f"{num_prompts} prompts x n={n} is {num_prompts * n} generations; at most {limit} are allowed "
            "per request (--max-prompts)",
        )


def check_prompt(services: Services, prompt_ids: list[int]) -> None:
    """`--max-prompt-tokens`, and a prompt that alone fills the context (the exact context bound,
    prefix and output included, is the engine's check; this one spares its scan of a huge prompt)."""
    limit = services.limits.max_prompt_tokens
    if limit is not None and len(prompt_ids) > limit:
        raise ApiError(
            422, "invalid_request", f"the prompt has {len(prompt_ids)} tokens; at most {limit} are allowed"
        )
    max_len = services.engine.stats().max_len
    if len(prompt_ids) >= max_len:
        message = f"the prompt has {len(prompt_ids)} tokens; the context holds {max_len} positions in all"
        raise ApiError(422, "context_too_long", message)


async def resolve_prefix(services: Services, task_id: str) -> PrefixEntry:
    prefix = await services.prefixes.get(task_id)
    if prefix is None:
        raise unknown_task(task_id)
    return prefix


def start(
    services: Services,
    caller: Caller,
    prefix: PrefixEntry,
    prompt_ids: list[int],
    params: SamplingParams,
    arrival: float,
) -> Started:
    """Submit to the engine; the task stays pinned in the prefix cache until the request is over."""
    check_prompt(services, prompt_ids)
    prefixes, task_id = services.prefixes, prefix.meta.task_id
    prefixes.pin(task_id)
    try:
        handle = services.engine.submit(
            prefix, prompt_ids, params, on_done=lambda: prefixes.unpin(task_id), tenant=caller.tenant
        )
    except BaseException:
        prefixes.unpin(task_id)
        raise
    return Started(prefix, prompt_ids, handle, arrival, caller)
