"""Who is calling `/generate` and `/v1/*`, and may they use this task now."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header

from prefix_store.entry import PrefixMeta
from server.api.auth import bearer_token, is_admin_token
from server.api.deps import Services, get_services
from server.api.errors import ApiError
from server.tenancy.keys import ApiKey
from server.tenancy.scopes import is_in_scope, scope_ranges


@dataclass(frozen=True)
class Caller:
    """An API key's holder, or (key None) the admin or anyone while no keys are configured."""

    key: ApiKey | None

    @property
    def tenant(self) -> str | None:
        """The scheduler's fairness unit: the key; None falls back to the task's namespace."""
        return None if self.key is None else self.key.id

    def can_use(self, task_id: str) -> bool:
        return self.key is None or is_in_scope(task_id, self.key.scopes)


async def authenticate(
    services: Annotated[Services, Depends(get_services)],
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    """401 without a valid key once keys are configured; before that, everyone may generate."""
    token = bearer_token(authorization)
    if is_admin_token(services, token):
        return Caller(None)
    if not services.keys.is_enabled:
        return Caller(None)  # development mode (logged loudly at start-up); any bearer is ignored
    if not token:
        raise ApiError(
            401, "unauthorized", "send `Authorization: Bearer <API key>`", {"WWW-Authenticate": "Bearer"}
        )
    key = await services.keys.lookup(token)
    if key is None:
        raise ApiError(401, "unauthorized", "the API key is not valid (unknown or revoked)")
    return Caller(key)


CallerDep = Annotated[Caller, Depends(authenticate)]


def check_scope(caller: Caller, task_id: str) -> None:
    """403 for a task outside the key's scopes, whether or not the task exists."""
    if not caller.can_use(task_id):
        raise ApiError(403, "forbidden", f"this API key may not use task {task_id!r}")


async def admit(services: Services, caller: Caller, task_id: str) -> None:
    """Before any work: the server takes requests, the key may use the task and is within its limits."""
    if services.lifecycle.is_draining:
        raise ApiError(503, "unavailable", "the server is shutting down", {"Retry-After": "1"})
    check_scope(caller, task_id)
    if caller.key is not None:
        admission = await services.limiter.admit(caller.key)
        if not admission.is_admitted:
            raise ApiError(
                429,
                "rate_limited",
                f"API key {caller.key.id} is over its rate limit",
                {"Retry-After": str(admission.retry_after_s)},
            )


async def list_visible(
    services: Services, caller: Caller, limit: int, after: str | None
) -> tuple[list[PrefixMeta], bool]:
    """One page of the tasks the caller may use, in id order after `after`; and whether more follow."""
    prefixes, exact_ids = scope_ranges(("*",) if caller.key is None else caller.key.scopes)
    found: dict[str, PrefixMeta] = {}
    has_more = False
    for prefix in prefixes:  # every id in these ranges is in scope
        items, next_cursor = await services.prefixes.list(limit, after, prefix)
        found.update((m.task_id, m) for m in items)
        has_more = has_more or next_cursor is not None
    for task_id in exact_ids:
        meta = None if after is not None and task_id <= after else await services.prefixes.get_meta(task_id)
        if meta is not None:
            found[task_id] = meta
    page = [found[task_id] for task_id in sorted(found)]
    return page[:limit], has_more or len(page) > limit
