"""Admin bearer-token check."""

import secrets
from typing import Annotated

from fastapi import Header

from server.api.deps import Services, ServicesDep
from server.api.errors import ApiError


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    return authorization[len("bearer ") :].strip() or None


def is_admin_token(services: Services, token: str | None) -> bool:
    return token is not None and secrets.compare_digest(token.encode(), services.admin_token.encode())


def require_admin(
    services: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """401 without a bearer token, 403 with a wrong one."""
    check_admin(services, authorization)


def check_admin(services: Services, authorization: str | None) -> None:
    """Raise 401 without a bearer token, 403 with one that is not the admin token."""
    token = bearer_token(authorization)
    if token is None:
        raise ApiError(
            401, "unauthorized", "send `Authorization: Bearer <admin token>`", {"WWW-Authenticate": "Bearer"}
        )
    if not is_admin_token(services, token):
        raise ApiError(403, "forbidden", "the admin token is not valid")
