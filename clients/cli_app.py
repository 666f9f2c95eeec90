"""`prefixctl`'s app, its global options and what every command uses: a client for the
server named by them, and JSON output. The commands live in clients/cli_*.py by concern."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import httpx
import typer

from clients.client import PrefixClient
from clients.models import PrefixServerError

DEFAULT_URL = "http://127.0.0.1:8000"

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
class Target:
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
    ctx.obj = Target(url, token, api_key)


@contextmanager
def open_client(ctx: typer.Context) -> Iterator[PrefixClient]:
    """A client for the command; server and connection errors end the command with exit code 1."""
    target: Target = ctx.obj
    try:
        with PrefixClient(target.url, target.token, api_key=target.api_key) as client:
            yield client
    except PrefixServerError as exc:
        typer.echo(f"error {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except httpx.TransportError as exc:
        typer.echo(f"error connection_failed: {target.url}: {exc}", err=True)
        raise typer.Exit(1) from None


def print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2))
