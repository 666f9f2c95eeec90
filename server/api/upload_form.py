"""The multipart body of an upload, with plain fields held to UTF-8.

Starlette decodes a plain (file-less) form field as UTF-8 and, when that fails, silently as
Latin-1: an invalid `text` prefix would be stored as mojibake. Here such a field is refused
(422 `invalid_request`, naming the part and the byte), as the README documents.
"""

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from server.api.errors import ApiError


class _NotUtf8(Exception):
    def __init__(self, name: str, error: UnicodeDecodeError) -> None:
        super().__init__(f"form part `{name}` is not valid UTF-8 ({error.reason} at byte {error.start})")


class _Utf8FieldsParser(MultiPartParser):
    """Starlette's parser, but a plain field that is not UTF-8 is an error, not Latin-1."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _NotUtf8(part.field_name, exc) from exc
        super().on_part_end()


async def read_upload_form(request: Request, max_part_size: int) -> FormData:
    """Parse a multipart/form-data body (the caller closes the form); 422 for anything else."""
    content_type, _ = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(422, "invalid_request", "expected a multipart/form-data body")
    parser = _Utf8FieldsParser(request.headers, request.stream(), max_part_size=max_part_size)
    try:
        return await parser.parse()
    except _NotUtf8 as exc:
        raise ApiError(422, "invalid_request", str(exc)) from exc
    except Exception as exc:
        raise ApiError(422, "invalid_request", f"expected a multipart/form-data body: {exc}") from exc
