"""`prefixctl` commands on prefixes: upload (file, PEFT folder or text), list, show, delete, warm."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from clients.calls import Progress as ProgressCallback
from clients.calls import peft_files
from clients.cli_app import app, open_client, print_json
from clients.models import PrefixInfo

PROGRESS_MIN_BYTES = 1024 * 1024  # smaller uploads finish before a bar is worth drawing


def _info_json(info: PrefixInfo) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(info).items() if v is not None}


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
    with open_client(ctx) as client:
        if path is None:
            prefix_text = text if text is not None else Path(str(text_file)).read_text(encoding="utf-8")
            info = client.upload_text(task_id, prefix_text)
        else:
            weights, config = _weights_and_config(path, config)
            with _progress_bar(weights.stat().st_size, f"upload {task_id}") as progress:
                info = client.upload(task_id, weights, config, progress)
    print_json(_info_json(info))


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
    with open_client(ctx) as client:
        if all_pages:
            items, next_cursor = list(client.iter_prefixes(page_size=limit)), None
        else:
            page = client.list(limit, cursor)
            items, next_cursor = list(page.items), page.next_cursor
    if as_json:
        print_json({"items": [_info_json(i) for i in items], "next_cursor": next_cursor})
        return
    Console().print(_table(items))
    if next_cursor is not None:
        typer.echo(f"more: --cursor {next_cursor} (or --all)", err=True)


@app.command()
def show(ctx: typer.Context, task_id: str) -> None:
    """Print one prefix's metadata as JSON."""
    with open_client(ctx) as client:
        info = client.get(task_id)
    print_json(_info_json(info))


@app.command()
def delete(ctx: typer.Context, task_id: str) -> None:
    """Delete a task's prefix."""
    with open_client(ctx) as client:
        client.delete(task_id)
    typer.echo(f"deleted {task_id}")


@app.command()
def warm(ctx: typer.Context, task_id: str) -> None:
    """Prefetch a prefix into the server's caches; prints its metadata and tiers."""
    with open_client(ctx) as client:
        info = client.warm(task_id)
    print_json(_info_json(info))
