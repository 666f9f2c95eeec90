"""Who is calling `/generate` and `/v1/*`, and may they use this task now."""

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from prefix_store.meta import PrefixMeta
from server.api.auth import bearer_token, is_admin_token
from server.api.background import in_background
from server.api.deps import Services, ServicesDep
from server.api.errors import ApiError
from server.tenancy.keys import ApiKey
from server.tenancy.scopes import is_in_scope, scope_ranges

TOKEN_HOLD_STATE = "token_hold"  # request.state name of the request's `TokenHold`
CALLER_STATE = "caller"  # request.state name of the authenticated `Caller`


@dataclass
class TokenHold:
    """Tokens one HTTP request holds from its key's bucket since admission; given back when the
    request ends (`release_hold`, called by the request middleware, whatever the ending)."""

    key: ApiKey | None = None
    num_tokens: int = 0


@dataclass(frozen=True)
class Caller:
    """An API key's holder, or (key None) the admin or anyone while no keys are configured."""

    key: ApiKey | None
    hold: TokenHold = field(default_factory=TokenHold, compare=False)

    @property
    def tenant(self) -> str | None:
        """The scheduler's fairness unit: the key; None falls back to the task's namespace."""
        return None if self.key is None else self.key.id

    def can_use(self, task_id: str) -> bool:
        return self.key is None or is_in_scope(task_id, self.key.scopes)


async def authenticate(
    request: Request,
    services: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    """The caller, as the auth gate (`server/api/auth_gate.py`) found it from the headers before
    the body was read; found here when the gate did not run (e.g. an app without it)."""
    known = getattr(request.state, CALLER_STATE, None)
    if isinstance(known, Caller):
        return known
    caller = await caller_for(services, authorization)
    setattr(request.state, CALLER_STATE, caller)
    return _remembered(request, caller)


async def caller_for(services: Services, authorization: str | None) -> Caller:
    """From the `Authorization` header alone: 401 without a valid key once keys are configured;
    before that, everyone may generate. Until the key store has been read once, nobody but the
    admin may: 503, never open."""
    token = bearer_token(authorization)
    if is_admin_token(services, token):
        return Caller(None)
    if not services.keys.is_known:
        raise ApiError(
            503,
            "unavailable",
            "API keys cannot be checked yet (the key store has not been read); try again",
            {"Retry-After": "1"},
        )
    if not services.keys.is_enabled:
        return Caller(None)  # development mode (logged loudly); bearer ignored
    if not token:
        raise ApiError(
            401, "unauthorized", "send `Authorization: Bearer <API key>`", {"WWW-Authenticate": "Bearer"}
        )
    key = await services.keys.lookup(token)
    if key is None:
        raise ApiError(401, "unauthorized", "the API key is not valid (unknown or revoked)")
    return Caller(key)


def _remembered(request: Request, caller: Caller) -> Caller:
    """Put the caller's token hold where the middleware finds it when the request ends."""
    setattr(request.state, TOKEN_HOLD_STATE, caller.hold)
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]


def check_scope(caller: Caller, task_id: str) -> None:
    """403 for a task outside the key's scopes, whether or not the task exists."""
    if not caller.can_use(task_id):
        raise ApiError(403, "forbidden", f"this API key may not use task {task_id!r}")


async def admit(
    services: Services, caller: Caller, task_id: str, max_tokens: int = 0, take_request: bool = True
) -> None:
    """Before any work: the server takes requests, the key may use the task and is within its
    limits. `max_tokens`: the most the request may generate in all (`max_tokens x n x prompts`),
    held from the key's token bucket until the request ends; 422 if the bucket can never hold it.
    `take_request=False`: only hold more tokens for a request admitted already."""
    if services.lifecycle.is_refusing:
        raise ApiError(503, "unavailable", services.lifecycle.refusal, {"Retry-After": "1"})
    check_scope(caller, task_id)
    key = caller.key
    if key is None:
        return
    admission = await services.limiter.admit(key, max_tokens, take_request)
    if not admission.can_ever_fit:
        raise ApiError(
            422,
            "invalid_request",
            f"this request may generate up to {max_tokens} tokens (max tokens x n x prompts), more "
            f"than API key {key.id}'s limit of tokens_per_minute={key.tokens_per_minute}; ask for fewer",
        )
    if not admission.is_admitted:
        raise ApiError(
            429,
            "rate_limited",
            f"API key {key.id} is over its rate limit",
            {"Retry-After": str(admission.retry_after_s)},
        )
    caller.hold.key, caller.hold.num_tokens = key, caller.hold.num_tokens + admission.num_held


def release_hold(services: Services, state: dict[str, Any]) -> None:
    """When a request has ended (answered, streamed, cancelled or failed): give back the tokens
    its admission held. What it really generated is charged separately, as its rows end."""
    hold: TokenHold | None = state.get(TOKEN_HOLD_STATE)
    if hold is None or hold.key is None or hold.num_tokens <= 0:
        return
    key, num_tokens = hold.key, hold.num_tokens
    hold.num_tokens = 0
    in_background(services.limiter.release(key, num_tokens))


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
