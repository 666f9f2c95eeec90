"""Liveness, readiness and the Prometheus endpoint."""

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from server.api.auth import bearer_token
from server.api.deps import ServicesDep
from server.api.errors import ApiError

router = APIRouter()


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    store: bool  # the prefix store (Redis) answers
    engine: bool  # the engine thread is alive
    draining: bool  # shutting down: no new requests


@router.get("/health")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}}
)
async def ready(services: ServicesDep) -> JSONResponse:
    is_store_ok = await services.prefixes.ping()
    is_engine_ok = services.engine.stats().is_alive
    is_draining = services.lifecycle.is_draining
    body = Readiness(
        ready=is_store_ok and is_engine_ok and not is_draining,
        store=is_store_ok,
        engine=is_engine_ok,
        draining=is_draining,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(
    services: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """Prometheus text format; with `--metrics-token` set, only for `Authorization: Bearer <it>`
    (401 without a bearer token, 403 with a wrong one); without it, only until API keys exist."""
    token = bearer_token(authorization)
    if not services.metrics.is_allowed(token):
        if services.metrics.token is None:
            raise ApiError(
                403,
                "forbidden",
                "API keys exist, so /metrics needs a token: start the server with --metrics-token "
                "(env PREFIX_SERVE_METRICS_TOKEN) and send it as `Authorization: Bearer <it>`",
            )
        if token is None:
            raise ApiError(
                401,
                "unauthorized",
                "send `Authorization: Bearer <metrics token>`",
                {"WWW-Authenticate": "Bearer"},
            )
        raise ApiError(403, "forbidden", "the metrics token is not valid")
    return Response(services.metrics.render(), media_type=services.metrics.content_type)
