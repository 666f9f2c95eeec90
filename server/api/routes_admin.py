"""Admin prefix routes, behind the bearer token."""

import dataclasses
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.datastructures import FormData, UploadFile

from prefix_store.meta import PrefixMeta, WarmedPrefix
from server.api.auth import require_admin
from server.api.deps import Services, ServicesDep
from server.api.errors import ApiError, unknown_task
from server.api.schemas import TASK_ID_PATTERN, CacheContents, PrefixList, error_responses
from server.api.upload_form import read_upload_form

router = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin)], responses=error_responses(401, 403, 422, 503)
)
TaskIdPath = Annotated[str, Path(pattern=TASK_ID_PATTERN)]


async def _read_part(part: object, name: str, limit: int) -> bytes | None:
    if part is None:
        return None
    data = await part.read(limit + 1) if isinstance(part, UploadFile) else str(part).encode()
    if len(data) > limit:
        raise ApiError(413, "too_large", f"part `{name}` is larger than the {limit} bytes allowed")
    return data


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "weights": {"type": "string", "format": "binary", "description": "safetensors"},
                    "config": {
                        "type": "string",
                        "format": "binary",
                        "description": "PEFT adapter_config.json",
                    },
                    "text": {"type": "string", "description": "a plain-text prefix"},
                },
            }
        }
    },
}


@router.put(
    "/prefixes/{task_id}",
    status_code=201,
    responses=error_responses(413),
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_prefix(task_id: TaskIdPath, request: Request, services: ServicesDep) -> PrefixMeta:
    """Multipart: `weights` (safetensors) [+ `config` (PEFT adapter_config.json)], or `text` (UTF-8).

    The body as a whole is bounded by the body-limit middleware; each part here."""
    max_upload_bytes = services.limits.max_upload_bytes
    form = await read_upload_form(request, max_part_size=max_upload_bytes + 1)
    try:
        return await _upload(task_id, form, services)
    finally:
        await form.close()


async def _upload(task_id: str, form: FormData, services: Services) -> PrefixMeta:
    max_upload_bytes = services.limits.max_upload_bytes
    unknown = sorted(set(form.keys()) - {"weights", "config", "text"})
    if unknown:
        raise ApiError(
            422, "invalid_request", f"unknown form parts {unknown}; expected `weights` [+ `config`] or `text`"
        )
    weights = await _read_part(form.get("weights"), "weights", max_upload_bytes)
    config = await _read_part(form.get("config"), "config", 1024 * 1024)
    text_bytes = await _read_part(form.get("text"), "text", 4 * 1024 * 1024)
    if weights is None and text_bytes is None:
        raise ApiError(422, "invalid_request", "missing form part `weights` (a safetensors file) or `text`")
    try:
        text = None if text_bytes is None else text_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:  # a file part; plain fields are checked as they are parsed
        raise ApiError(422, "invalid_request", f"form part `text` is not valid UTF-8: {exc}") from exc
    return await services.prefixes.upload(task_id, weights, config, text)


@router.get("/prefixes")
async def list_prefixes(
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> PrefixList:
    if cursor is not None and not re.fullmatch(TASK_ID_PATTERN, cursor):
        raise ApiError(422, "invalid_request", "cursor must be a task_id returned as next_cursor")
    items, next_cursor = await services.prefixes.list(limit, cursor)
    return PrefixList(items=items, next_cursor=next_cursor)


@router.get("/prefixes/{task_id}", responses=error_responses(404))
async def get_prefix(task_id: TaskIdPath, services: ServicesDep) -> PrefixMeta:
    meta = await services.prefixes.get_meta(task_id)
    if meta is None:
        raise unknown_task(task_id)
    return meta


@router.post("/prefixes/{task_id}/warm", responses=error_responses(404))
async def warm_prefix(task_id: TaskIdPath, services: ServicesDep) -> WarmedPrefix:
    """Prefetch a task into host memory ahead of its traffic (its first row copies it into the KV
    pool, the device tier, without a Redis read); `tiers` says where it is resident now."""
    entry = await services.prefixes.warm(task_id)
    if entry is None:
        raise unknown_task(task_id)
    tiers = tuple(sorted({r.tier for r in services.prefixes.resident() if r.task_id == task_id}))
    return WarmedPrefix(**dataclasses.asdict(entry.meta), tiers=tiers)


@router.get("/cache")
async def cache_contents(services: ServicesDep) -> CacheContents:
    """What is resident in which tier (device, host), least recently used first."""
    return CacheContents(tiers=services.prefixes.usage(), items=services.prefixes.resident())


@router.delete("/prefixes/{task_id}", status_code=204, responses=error_responses(404))
async def delete_prefix(task_id: TaskIdPath, services: ServicesDep) -> None:
    if not await services.prefixes.delete(task_id):
        raise unknown_task(task_id)
