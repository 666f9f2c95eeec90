"""Map every failure to `{"error": {"code", "message"}}` with a fitting status."""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefix_store.errors import InvalidPrefix, ModelMismatch, StoreUnavailable
from server.engine.errors import ContextTooLong, EngineStopped, InvalidInput, QueueFull

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
MAX_SHOWN_ERRORS = 3  # validation errors named in a message; the rest are only counted
MAX_PART_CHARS = 200  # one error's `where: what`, cut; a hostile body's key names can be huge


class ApiError(Exception):
    """An error answer with a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def unknown_task(task_id: str) -> ApiError:
    """The 404 of a task (or OpenAI model) that has no prefix uploaded."""
    return ApiError(404, "unknown_task", f"no prefix is uploaded for task_id {task_id!r}")


def _hidden_store_cause(exc: Exception) -> str:
    # the cause names internal addresses (`connecting to 10.0.0.5:6379`): the log gets it, clients do not
    log.warning("answering 503 store_unavailable: %s", exc)
    return "prefix store unavailable; try again later"


@dataclass(frozen=True)
class _Answer:
    """How one exception type is answered; `is_retryable` adds `Retry-After`."""

    status: int
    code: str
    is_retryable: bool = False
    message: Callable[[Exception], str] = str


_ANSWERS: dict[type[Exception], _Answer] = {  # the one exception -> (status, code, headers) table
    InvalidPrefix: _Answer(422, "invalid_prefix"),
    ModelMismatch: _Answer(422, "model_mismatch"),
    StoreUnavailable: _Answer(503, "store_unavailable", True, _hidden_store_cause),
    ContextTooLong: _Answer(422, "context_too_long"),
    InvalidInput: _Answer(422, "invalid_request"),
    QueueFull: _Answer(429, "overloaded", True, lambda exc: f"server overloaded: {exc}"),
    EngineStopped: _Answer(503, "unavailable", True),
}


def to_api_error(exc: Exception) -> ApiError:
    """Translate engine/store exceptions into the contract's codes (anything unknown: 500)."""
    if isinstance(exc, ApiError):
        return exc
    answer = next((_ANSWERS[t] for t in type(exc).__mro__ if t in _ANSWERS), None)
    if answer is None:
        return ApiError(500, "internal", "internal error")
    headers = {"Retry-After": RETRY_AFTER_S} if answer.is_retryable else None
    return ApiError(answer.status, answer.code, answer.message(exc), headers)


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_OPENAI_CODES = {"unknown_task": "model_not_found"}


def error_response(error: ApiError, path: str = "", param: str | None = None) -> JSONResponse:
    """Our shape `{"error": {code, message}}`; on `/v1/*` OpenAI's (`message, type, param, code`),
    with 422 reported as 400 as OpenAI does."""
    if not path.startswith("/v1/"):
        body = {"error": {"code": error.code, "message": error.message}}
        return JSONResponse(body, status_code=error.status, headers=error.headers)
    status = 400 if error.status == 422 else error.status
    openai_error = {
        "message": error.message,
        "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param,
        "code": _OPENAI_CODES.get(error.code, error.code),
    }
    return JSONResponse({"error": openai_error}, status_code=status, headers=error.headers)


def _cut(text: str, limit: int = MAX_PART_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_message(errors: Sequence[Any]) -> str:
    """The first few errors as `where: what` (each cut short) and how many more there were: the
    message stays small whatever the body (a hostile one can make thousands of errors)."""
    parts = []
    for err in errors[:MAX_SHOWN_ERRORS]:
        where = ".".join(_cut(str(p), 64) for p in err.get("loc", ()) if p != "body")
        what = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":  # loc holds a character position, ctx the reason
            where, what = "body", f"{what}: {err.get('ctx', {}).get('error', '')}"
        parts.append(_cut(f"{where or 'body'}: {what}"))
    if len(errors) > MAX_SHOWN_ERRORS:
        parts.append(f"and {len(errors) - MAX_SHOWN_ERRORS} more errors")
    return "; ".join(parts)


def _first_param(errors: Sequence[Any]) -> str | None:
    for err in errors[:MAX_SHOWN_ERRORS]:
        names = [str(p) for p in err.get("loc", ()) if p != "body" and not isinstance(p, int)]
        if names:
            return _cut(names[0], 64)
    return None


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc), request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        error = ApiError(422, "invalid_request", validation_message(errors))
        return error_response(error, request.url.path, _first_param(errors))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # FastAPI: not UTF-8
            error = ApiError(422, "invalid_request", "the body is not JSON: expected a UTF-8 JSON object")
            return error_response(error, request.url.path)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        code = codes.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, code, str(exc.detail)), request.url.path)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for exc_type in _ANSWERS:
        app.add_exception_handler(exc_type, on_api_error)
    app.add_exception_handler(Exception, on_api_error)  # anything else: 500 internal, as JSON
