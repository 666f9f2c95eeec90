"""Logging setup: text for people, JSON lines for log pipelines (`--log-format`)."""

import json
import logging
import re
import time
from typing import Any

ACCESS_LOGGER = "prefix_server.access"

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
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # route uvicorn's own lines through the same format
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
