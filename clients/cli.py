"""`prefixctl`: upload, inspect and delete prefixes, manage tenant API keys, drain a replica for
maintenance, and generate, from the shell.

Server errors print `error <code>: <message>` on stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from clients.client import ChatSampling, PrefixClient, Sampling, peft_files
from clients.client import Progress as ProgressCallback
from clients.models import DrainState, Generation, KeyInfo, PrefixInfo, PrefixServerError

DEFAULT_URL = "http://127.0.0.1:8000"
PROGRESS_MIN_BYTES = 1024 * 1024  # smaller uploads finish before a bar is worth drawing

app = typer.Typer(
    name="prefixctl",
    help="Manage the prefixes and API keys of a prefix server, and generate with them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    name="keys",
    help="Create, list and revoke tenant API keys (admin token).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app)


@dataclasses.dataclass(frozen=True)
class _Target:
    url: str
    token: str | None
    api_key: str | None


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="PREFIX_URL", help="Server base URL.")] = DEFAULT_URL,
    token: Annotated[
        str | None, typer.Option(envvar="PREFIX_ADMIN_TOKEN", help="Admin token (admin commands).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="PREFIX_API_KEY", help="Tenant API key (generate); without one, the admin token."
        ),
    ] = None,
) -> None:
    ctx.obj = _Target(url, token, api_key)


@contextmanager
def _client(ctx: typer.Context) -> Iterator[PrefixClient]:
    """A client for the command; server and connection errors end the command with exit code 1."""
    target: _Target = ctx.obj
    try:
        with PrefixClient(target.url, target.token, api_key=target.api_key) as client:
            yield client
    except PrefixServerError as exc:
        typer.echo(f"error {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except httpx.TransportError as exc:
        typer.echo(f"error connection_failed: {target.url}: {exc}", err=True)
        raise typer.Exit(1) from None


def _info_json(info: PrefixInfo) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(info).items() if v is not None}


def _print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2))


def _generation_json(generation: Generation) -> dict[str, Any]:
    """The answer in the server's own shape (usage nested)."""
    data = dataclasses.asdict(generation)
    usage = {k: data.pop(k) for k in ("prompt_tokens", "completion_tokens", "prefix_tokens")}
    return {**data, "token_ids": list(generation.token_ids), "usage": usage}


@contextmanager
def _progress_bar(total: int, label: str) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr for uploads above PROGRESS_MIN_BYTES, else no callback."""
    if total <= PROGRESS_MIN_BYTES:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda sent, size: bar.update(task, completed=sent, total=size)


def _weights_and_config(path: Path, config: Path | None) -> tuple[Path, Path | None]:
    if not path.is_dir():
        return path, config
    if config is not None:
        raise typer.BadParameter("--config goes with a safetensors file, not a PEFT directory")
    try:
        return peft_files(path)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="PATH") from None


@app.command()
def upload(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="Task id, e.g. acme:summarize.")],
    path: Annotated[
        Path | None,
        typer.Argument(exists=True, help="A safetensors file, or a PEFT checkpoint directory."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="PEFT adapter_config.json for a PEFT file."),
    ] = None,
    text: Annotated[str | None, typer.Option(help="A plain-text prefix.")] = None,
    text_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A UTF-8 file holding a text prefix.")
    ] = None,
) -> None:
    """Upload a prefix (a new version if the task exists) and print its metadata."""
    if sum(source is not None for source in (path, text, text_file)) != 1:
        raise typer.BadParameter("give exactly one of PATH, --text or --text-file")
    if config is not None and path is None:
        raise typer.BadParameter("--config goes with PATH, not with a text prefix")
    with _client(ctx) as client:
        if path is None:
            prefix_text = text if text is not None else Path(str(text_file)).read_text(encoding="utf-8")
            info = client.upload_text(task_id, prefix_text)
        else:
            weights, config = _weights_and_config(path, config)
            with _progress_bar(weights.stat().st_size, f"upload {task_id}") as progress:
                info = client.upload(task_id, weights, config, progress)
    _print_json(_info_json(info))


def _table(items: list[PrefixInfo]) -> Table:
    table = Table("task_id", "version", "prefix_len", "num_bytes", "dtype", "source", "created_at")
    for info in items:
        table.add_row(
            info.task_id,
            str(info.version),
            str(info.prefix_len),
            str(info.num_bytes),
            info.dtype,
            info.source or "",
            info.created_at,
        )
    return table


@app.command("list")
def list_prefixes(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Page size.")] = 100,
    cursor: Annotated[str | None, typer.Option(help="Start after this task id (a next_cursor).")] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="Follow cursors through every page.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List prefixes, one page (or every page with --all)."""
    with _client(ctx) as client:
        if all_pages:
            items, next_cursor = list(client.iter_prefixes(page_size=limit)), None
        else:
            page = client.list(limit, cursor)
            items, next_cursor = list(page.items), page.next_cursor
    if as_json:
        _print_json({"items": [_info_json(i) for i in items], "next_cursor": next_cursor})
        return
    Console().print(_table(items))
    if next_cursor is not None:
        typer.echo(f"more: --cursor {next_cursor} (or --all)", err=True)


@app.command()
def show(ctx: typer.Context, task_id: str) -> None:
    """Print one prefix's metadata as JSON."""
    with _client(ctx) as client:
        info = client.get(task_id)
    _print_json(_info_json(info))


@app.command()
def delete(ctx: typer.Context, task_id: str) -> None:
    """Delete a task's prefix."""
    with _client(ctx) as client:
        client.delete(task_id)
    typer.echo(f"deleted {task_id}")


@app.command()
def warm(ctx: typer.Context, task_id: str) -> None:
    """Prefetch a prefix into the server's caches; prints its metadata and tiers."""
    with _client(ctx) as client:
        info = client.warm(task_id)
    _print_json(_info_json(info))


def _key_json(key: KeyInfo) -> dict[str, Any]:
    """The key in the server's own shape (with `key`, the secret, for a CreatedKey)."""
    return {**dataclasses.asdict(key), "scopes": list(key.scopes)}


def _rate(value: float) -> str:
    return "unlimited" if value == 0 else f"{value:g}"


def _keys_table(keys: list[KeyInfo]) -> Table:
    table = Table("id", "name", "scopes", "requests_per_second", "tokens_per_minute", "created_at")
    for key in keys:
        table.add_row(
            key.id,
            key.name,
            " ".join(key.scopes),
            _rate(key.requests_per_second),
            _rate(key.tokens_per_minute),
            key.created_at,
        )
    return table


@keys_app.command("create")
def create_key(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A label for the key, e.g. the tenant's name.")],
    scope: Annotated[
        list[str],
        typer.Option(help="A task id, or a prefix ending in * (quote it: 'acme:*'); repeat for more."),
    ],
    rps: Annotated[float, typer.Option(min=0, help="Requests per second (0 = unlimited).")] = 0,
    tpm: Annotated[int, typer.Option(min=0, help="Generated tokens per minute (0 = unlimited).")] = 0,
) -> None:
    """Create an API key and print it as JSON, its secret `key` included (shown only this once).

    The first key closes the server's open development mode for good: from then on /generate
    and /v1/* need a key (or the admin token).
    """
    with _client(ctx) as client:
        created = client.create_key(name, scope, rps, tpm)
    _print_json(_key_json(created))
    typer.echo(f"warning: the secret of {created.id} is shown only this once; store it now", err=True)


@keys_app.command("list")
def list_keys(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the API keys (never their secrets)."""
    with _client(ctx) as client:
        keys = client.list_keys()
    if as_json:
        _print_json({"items": [_key_json(key) for key in keys]})
        return
    Console().print(_keys_table(keys))


@keys_app.command("revoke")
def revoke_key(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")]
) -> None:
    """Revoke an API key: refused from its next request on."""
    with _client(ctx) as client:
        info = client.revoke_key(key_id)
    typer.echo(f"revoked {info.id} ({info.name})")


def _wait_drained(client: PrefixClient, state: DrainState, timeout_s: float) -> DrainState:
    """Poll until nothing is in flight; exit 1 (the replica stays drained) past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not state.drained:
        if time.monotonic() > deadline:
            _print_json(dataclasses.asdict(state))
            typer.echo(f"error not_drained: still {state.requests_in_flight} in flight", err=True)
            raise typer.Exit(1)
        time.sleep(0.2)
        state = client.drain_state()
    return state


@app.command()
def drain(
    ctx: typer.Context,
    wait: Annotated[bool, typer.Option(help="Wait until no request is in flight any more.")] = False,
    timeout: Annotated[float, typer.Option(min=0, help="Seconds --wait waits at most.")] = 600.0,
    grace: Annotated[
        float | None,
        typer.Option(min=0, help="Seconds new work is still served while the proxy notices (3)."),
    ] = None,
) -> None:
    """Take the replica at --url out of rotation for maintenance: its /ready fails, so the proxy
    sends it no new work; after --grace, requests that still reach it get a retry-safe 503;
    running requests finish. Prints its drain state. Call the replica's own port, not the proxy."""
    with _client(ctx) as client:
        state = client.drain(grace)
        if wait:
            state = _wait_drained(client, state, timeout)
    _print_json(dataclasses.asdict(state))


@app.command()
def undrain(ctx: typer.Context) -> None:
    """Put the replica at --url back into rotation after `drain` (the proxy's health checks see
    it ready again within a few seconds)."""
    with _client(ctx) as client:
        state = client.undrain()
    _print_json(dataclasses.asdict(state))


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
    with _client(ctx) as client:
        if not stream:
            generation = client.generate(task_id, prompt, **sampling)
            if as_json:
                _print_json(_generation_json(generation))
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
    with _client(ctx) as client:
        if not stream:
            answer = client.chat(task_id, messages, **sampling)
            typer.echo(json.dumps(dataclasses.asdict(answer), indent=2) if as_json else answer.content)
            return
        for chunk in client.chat_stream(task_id, messages, **sampling):
            typer.echo(json.dumps(dataclasses.asdict(chunk)) if as_json else chunk.content, nl=as_json)
        if not as_json:
            typer.echo("")


if __name__ == "__main__":
    app()
