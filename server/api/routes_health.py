"""Liveness, readiness and the Prometheus endpoint."""

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api.auth import bearer_token
from server.api.deps import Services, get_services
from server.api.errors import ApiError

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready (same body)"}})
async def ready(services: Annotated[Services, Depends(get_services)]) -> JSONResponse:
    is_store_ok = await services.prefixes.ping()
    is_engine_ok = services.engine.stats().is_alive
    is_draining = services.lifecycle.is_draining
    body = {
        "ready": is_store_ok and is_engine_ok and not is_draining,
        "store": is_store_ok,
        "engine": is_engine_ok,
        "draining": is_draining,
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(
    services: Annotated[Services, Depends(get_services)],
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """Prometheus text format; with `--metrics-token` set, only for `Authorization: Bearer <it>`
    (401 without a bearer token, 403 with a wrong one)."""
    token = bearer_token(authorization)
    if not services.metrics.is_allowed(token):
        if token is None:
            raise ApiError(
                401,
                "unauthorized",
                "send `Authorization: Bearer <metrics token>`",
                {"WWW-Authenticate": "Bearer"},
            )
        raise ApiError(403, "forbidden", "the metrics token is not valid")
    return Response(services.metrics.render(), media_type=services.metrics.content_type)
