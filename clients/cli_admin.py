"""`prefixctl` admin commands: tenant API keys (`keys create|list|revoke`) and taking one replica
out of rotation for maintenance (`drain`, `undrain`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from clients.cli_app import app, keys_app, open_client, print_json
from clients.client import PrefixClient
from clients.models import DrainState, KeyInfo


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
    with open_client(ctx) as client:
        created = client.create_key(name, scope, rps, tpm)
    print_json(_key_json(created))
    typer.echo(f"warning: the secret of {created.id} is shown only this once; store it now", err=True)


@keys_app.command("list")
def list_keys(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the API keys (never their secrets)."""
    with open_client(ctx) as client:
        keys = client.list_keys()
    if as_json:
        print_json({"items": [_key_json(key) for key in keys]})
        return
    Console().print(_keys_table(keys))


@keys_app.command("revoke")
def revoke_key(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")]
) -> None:
    """Revoke an API key: refused from its next request on."""
    with open_client(ctx) as client:
        info = client.revoke_key(key_id)
    typer.echo(f"revoked {info.id} ({info.name})")


def _wait_drained(client: PrefixClient, state: DrainState, timeout_s: float) -> DrainState:
    """Poll until nothing is in flight; exit 1 (the replica stays drained) past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not state.drained:
        if time.monotonic() > deadline:
            print_json(dataclasses.asdict(state))
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
    with open_client(ctx) as client:
        state = client.drain(grace)
        if wait:
            state = _wait_drained(client, state, timeout)
    print_json(dataclasses.asdict(state))


@app.command()
def undrain(ctx: typer.Context) -> None:
    """Put the replica at --url back into rotation after `drain` (the proxy's health checks see
    it ready again within a few seconds)."""
    with open_client(ctx) as client:
        state = client.undrain()
    print_json(dataclasses.asdict(state))
