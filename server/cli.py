"""`prefix-serve`: parse flags into Settings and run the HTTP server."""

import argparse
import asyncio
import signal
import socket
import sys
import tempfile
from types import FrameType
from typing import Any

import uvicorn

from server.api.lifecycle import Lifecycle
from server.config import Settings
from server.engine.model_source import ModelSourceError, locate_model
from server.http_conn import ConnectionLimits, guarded_protocol
from server.http_guard import StartupError, bind_listener, install_accept_log_limit, raise_fd_limit
from server.logs import console_error, route_library_logs, setup_logging


def parse_args(argv: list[str] | None = None) -> Settings:
    """Flags override env `PREFIX_SERVE_*`, which overrides the defaults."""
    parser = argparse.ArgumentParser(
        prog="prefix-serve", description="Serve one frozen LM with per-task prefixes."
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None, help=field.description)
    given: dict[str, Any] = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**given)


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (503 to new generations, `/ready` false,
    running ones finish up to `--drain-seconds`) before the usual shutdown; a second one exits now."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._is_drain_asked = False
        self._drain: asyncio.Future[bool] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._is_drain_asked or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it after shutdown, as it would
        self._is_drain_asked = True  # a signal handler: the drain itself starts on the loop (on_tick)

    async def on_tick(self, counter: int) -> bool:
        if self._is_drain_asked and self._drain is None:
            self._drain = asyncio.ensure_future(self.lifecycle.drain())
        if self._drain is not None and self._drain.done():
            return True
        return await super().on_tick(counter)


def check_data_dir(settings: Settings) -> None:
    """The data dir exists (0700) and this process can write there, checked before anything starts."""
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=settings.data_dir):
            pass
    except OSError as exc:
        raise StartupError(
            f"data dir {settings.data_dir} is not usable ({exc.strerror or exc}); "
            f'pass a writable directory: make serve ARGS="--data-dir <dir>" (or PREFIX_SERVE_DATA_DIR)'
        ) from None


def check_model(settings: Settings) -> None:
    """`--model` is found (offline unless HF_HUB_OFFLINE=0) and runs no code the user has not allowed."""
    if settings.model is None:
        return
    try:
        locate_model(settings.model, settings.trust_remote_code)
    except ModelSourceError as exc:
        raise StartupError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    setup_logging(settings.log_level, settings.log_format)
    try:
        check_data_dir(settings)
        check_model(settings)
        listener = bind_listener(settings.host, settings.port)
    except StartupError as exc:
        console_error(str(exc))
        sys.exit(2)
    serve(settings, listener)


def trusted_proxies(settings: Settings) -> frozenset[str]:
    """The peers whose `X-Forwarded-For` is believed (`--forwarded-allow-ips`); none by default."""
    return frozenset(ip.strip() for ip in (settings.forwarded_allow_ips or "").split(",") if ip.strip())


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout,
        max_connections=settings.max_connections,
        max_per_client=settings.max_connections_per_client,
        min_body_rate=settings.min_body_rate,
        trusted_proxies=trusted_proxies(settings),
    )


def serve(settings: Settings, listener: socket.socket) -> None:
    """Run the app on an already bound socket until SIGTERM/SIGINT (then drain)."""
    from server.app import create_app  # torch and transformers load here: after the checks, not before

    route_library_logs()
    raise_fd_limit()
    install_accept_log_limit()
    app = create_app(settings)
    # access lines come from the app (one per request, with generation details), not uvicorn
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(connection_limits(settings)),
        log_level=settings.log_level,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,  # after the drain: answers still being written
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or [],
    )
    DrainingServer(config, app.state.lifecycle).run(sockets=[listener])
