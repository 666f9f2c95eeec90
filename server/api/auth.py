"""Admin bearer-token check."""

import secrets
from typing import Annotated

from fastapi import Depends, Header

from server.api.deps import Services, get_services
from server.api.errors import ApiError


def require_admin(
    services: Annotated[Services, Depends(get_services)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """401 without a bearer token, 403 with a wrong one."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(
            401, "unauthorized", "send `Authorization: Bearer <admin token>`", {"WWW-Authenticate": "Bearer"}
        )
    token = authorization[len("bearer ") :].strip()
    if not secrets.compare_digest(token.encode(), services.admin_token.encode()):
        raise ApiError(403, "forbidden", "the admin token is not valid")
