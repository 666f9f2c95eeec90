"""`prefix-serve`: parse flags into Settings and run the HTTP server."""

import argparse
from typing import Any

import uvicorn

from server.app import create_app
from server.config import Settings
from server.logs import setup_logging


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


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    setup_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    # access lines come from the app (one per request, with generation details), not uvicorn
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        log_config=None,
    )
