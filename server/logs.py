"""Logging setup: text for people, JSON lines for log pipelines (`--log-format`).

With `--log-format json` every line the process writes is one JSON object: the start-up lines
meant for a person (`console`), errors, Python warnings, uncaught exceptions and the libraries'
own log handlers all go through the one handler set up here."""

import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ACCESS_LOGGER = "prefix_server.access"
CONSOLE_LOGGER = "prefix_server.console"
# libraries that install their own stderr handler (plain text) when imported
_LIBRARY_LOGGERS = ("transformers", "huggingface_hub")
_json_mode = False

# C0/C1 controls and Unicode line/paragraph separators: a client-chosen value (a decoded path
# with %0a, a task id, a header) must never start a forged line in a text log.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` with every control character written as its escape (`\\n`, `\\x1b`, `\\u2028`)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The message, then the record's `fields` as key=value; one line per record (control
    characters in the message and the fields are escaped; only a traceback spans lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = escape_controls(super().formatMessage(record))
        fields = getattr(record, "fields", None)
        return line + "".join(escape_controls(f" {k}={v}") for k, v in fields.items()) if fields else line


def setup_logging(level: str, log_format: str) -> None:
    """One stderr handler on the root logger, in `log_format`; uvicorn and Python warnings use it.
    In JSON mode, uncaught exceptions (any thread) become one JSON line each, too."""
    global _json_mode
    _json_mode = log_format == "json"
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if _json_mode else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # route uvicorn's own lines through the same format
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # the start-up lines were printed at any --log-level; as records they keep that
    logging.getLogger(CONSOLE_LOGGER).setLevel(logging.INFO)
    logging.captureWarnings(True)
    if _json_mode:
        # progress bars (model download, "Loading weights") are not lines: none in JSON mode
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _log_uncaught(kind: type[BaseException], exc: BaseException | None, tb: TracebackType | None) -> None:
    if exc is not None:
        logging.getLogger("prefix_server").critical("uncaught exception", exc_info=(kind, exc, tb))


def route_library_logs() -> None:
    """Send the libraries' own handlers' lines (transformers prints `[transformers] ...`) through
    ours. Call after importing them: they install their handler on first import."""
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True
    if _json_mode and "transformers" in sys.modules:  # imported before setup_logging: its bars too
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def console(message: str, *, also_logged: bool = False) -> None:
    """A line for the person who started the server: `prefix-serve: <message>` on stdout in text
    mode; in JSON mode a record of the `prefix_server.console` logger instead (none when the same
    thing was `also_logged` as a record already)."""
    if not _json_mode:
        print(f"prefix-serve: {message}", flush=True)
    elif not also_logged:
        logging.getLogger(CONSOLE_LOGGER).info(message)


def console_error(message: str) -> None:
    """A start-up error: `prefix-serve: error: <message>` on stderr, or one JSON error record."""
    if _json_mode:
        logging.getLogger(CONSOLE_LOGGER).error(message)
    else:
        print(f"prefix-serve: error: {message}", file=sys.stderr, flush=True)


def announce_admin_token(token: str, is_new: bool, path: Path, is_given: bool) -> None:
    """Where the admin token is. A new one is shown only to a person at a terminal (text mode,
    stdout a tty): never into a log file, a container log or a pipe; it is in `path` (0600).
    A token given by flag, env or file is never shown (`is_given`)."""
    if is_given:
        return
    if is_new and not _json_mode and sys.stdout.isatty():
        console(f"admin token {token} (saved in {path})")
    elif is_new:
        console(f"new admin token saved in {path} (0600; shown only on a terminal)")
    else:
        console(f"admin token in {path}")
