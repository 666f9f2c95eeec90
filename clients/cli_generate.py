"""`prefixctl generate` and `prefixctl chat`: one answer, or its text as it is generated."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer

from clients.calls import ChatSampling, Sampling
from clients.cli_app import app, open_client, print_json
from clients.models import Generation


def _generation_json(generation: Generation) -> dict[str, Any]:
    """The answer in the server's own shape (usage nested)."""
    data = dataclasses.asdict(generation)
    usage = {k: data.pop(k) for k in ("prompt_tokens", "completion_tokens", "prefix_tokens")}
    return {**data, "token_ids": list(generation.token_ids), "usage": usage}


def _given(**options: Any) -> dict[str, Any]:
    """The options the user set (None, False and [] mean "the server's default")."""
    return {name: v for name, v in options.items() if v is not None and v is not False and v != []}


Temperature = Annotated[float | None, typer.Option(help="0 = greedy (the default).")]
Stop = Annotated[list[str] | None, typer.Option(help="A stop string (repeat for more, up to 4).")]
IgnoreEos = Annotated[bool, typer.Option(help="Always generate the maximum number of tokens.")]
FrequencyPenalty = Annotated[float | None, typer.Option(help="-2..2: minus this x a token's count so far.")]
PresencePenalty = Annotated[float | None, typer.Option(help="-2..2: minus this once a token appeared.")]
RepetitionPenalty = Annotated[float | None, typer.Option(help="(0, 2]: divides a seen token's logit.")]
Stream = Annotated[bool, typer.Option(help="Print text as it is generated.")]
AsJson = Annotated[bool, typer.Option("--json", help="The whole answer (with --stream: one event a line).")]


@app.command()
def generate(
    ctx: typer.Context,
    task_id: str,
    prompt: str,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate (default 64).")] = None,
    temperature: Temperature = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    frequency_penalty: FrequencyPenalty = None,
    presence_penalty: PresencePenalty = None,
    repetition_penalty: RepetitionPenalty = None,
    stream: Stream = False,
    as_json: AsJson = False,
) -> None:
    """Generate a continuation of PROMPT with TASK_ID's prefix."""
    sampling: Sampling = _given(  # type: ignore[assignment]
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        stop=stop, ignore_eos=ignore_eos, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
    )  # fmt: skip
    with open_client(ctx) as client:
        if not stream:
            generation = client.generate(task_id, prompt, **sampling)
            if as_json:
                print_json(_generation_json(generation))
            else:
                typer.echo(generation.text)
            return
        for event in client.stream(task_id, prompt, **sampling):
            if as_json:
                event_json = {**dataclasses.asdict(event), "token_ids": list(event.token_ids)}
                typer.echo(json.dumps(event_json))
            else:
                typer.echo(event.text, nl=False)
        if not as_json:
            typer.echo("")


@app.command()
def chat(
    ctx: typer.Context,
    task_id: str,
    message: str,
    system: Annotated[str | None, typer.Option(help="A system message before MESSAGE.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens to generate at most.")] = None,
    temperature: Temperature = None,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Stop = None,
    frequency_penalty: FrequencyPenalty = None,
    presence_penalty: PresencePenalty = None,
    repetition_penalty: RepetitionPenalty = None,
    stream: Stream = False,
    as_json: AsJson = False,
) -> None:
    """Send MESSAGE (as the user) to TASK_ID through the model's chat template; print the answer."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": message})
    sampling: ChatSampling = _given(  # type: ignore[assignment]
        max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
    )  # fmt: skip
    with open_client(ctx) as client:
        if not stream:
            answer = client.chat(task_id, messages, **sampling)
            typer.echo(json.dumps(dataclasses.asdict(answer), indent=2) if as_json else answer.content)
            return
        for chunk in client.chat_stream(task_id, messages, **sampling):
            typer.echo(json.dumps(dataclasses.asdict(chunk)) if as_json else chunk.content, nl=as_json)
        if not as_json:
            typer.echo("")
