"""Admin routes for tenant API keys, behind the admin bearer token."""

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from prefix_store.meta import ApiKey, CreatedKey
from server.api.auth import require_admin
from server.api.deps import ServicesDep
from server.api.errors import ApiError
from server.api.schemas import KeyCreate, KeyList, error_responses

router = APIRouter(
    prefix="/admin/keys", dependencies=[Depends(require_admin)], responses=error_responses(401, 403, 413, 422)
)


@router.post("", status_code=201)
async def create_key(body: KeyCreate, services: ServicesDep) -> CreatedKey:
    """A new key; its secret is in this answer only (Redis keeps its SHA-256)."""
    key, secret = await services.keys.create(
        body.name, tuple(body.scopes), body.requests_per_second, body.tokens_per_minute
    )
    return CreatedKey(**dataclasses.asdict(key), key=secret)


@router.get("")
async def list_keys(services: ServicesDep) -> KeyList:
    return KeyList(items=await services.keys.list())


@router.delete("/{key_id}", responses=error_responses(404))
async def revoke_key(
    key_id: Annotated[str, Path(pattern=r"^key_[0-9a-f]{16}$")], services: ServicesDep
) -> ApiKey:
    """Revoke a key: every replica refuses it from its next request on."""
    key = await services.keys.revoke(key_id)
    if key is None:
        raise ApiError(404, "unknown_key", f"no API key {key_id!r}")
    return key
