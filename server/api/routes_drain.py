"""`/admin/drain`: take this replica out of rotation for maintenance and bring it back, without
stopping the process. While drained, `/ready` answers 503 (a proxy's health check stops sending
work), running requests finish normally, and after a grace period (the time the health checks
take to notice) new generations get a retry-safe 503."""

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from server.api.auth import require_admin
from server.api.deps import Services, ServicesDep
from server.api.errors import ApiError
from server.api.schemas import ErrorBody, error_responses

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/admin/drain", dependencies=[Depends(require_admin)], responses=error_responses(401, 403)
)


class DrainState(BaseModel):
    """Whether this replica takes new generations, and what it still runs."""

    draining: bool = Field(description="/ready 503: a proxy sends no new work")
    refusing: bool = Field(description="new generations get a retry-safe 503")
    maintenance: bool = Field(description="drained by POST /admin/drain (undone by DELETE)")
    shutting_down: bool = Field(description="drained by SIGTERM: the process exits when done")
    requests_in_flight: int = Field(description="HTTP requests being answered (not probes or these)")
    generations_running: int
    generations_waiting: int
    drained: bool = Field(description="refusing and nothing in flight: safe for maintenance")


def drain_state(services: Services) -> DrainState:
    lifecycle, stats = services.lifecycle, services.engine.stats()
    return DrainState(
        draining=lifecycle.is_draining,
        refusing=lifecycle.is_refusing,
        maintenance=lifecycle.is_in_maintenance,
        shutting_down=lifecycle.is_stopping,
        requests_in_flight=lifecycle.num_in_flight,
        generations_running=stats.num_running,
        generations_waiting=stats.num_waiting,
        drained=lifecycle.is_refusing and lifecycle.num_in_flight == 0,
    )


@router.get("")
async def get_drain(services: ServicesDep) -> DrainState:
    return drain_state(services)


# HAProxy's checks (prefix_cluster/haproxy.cfg: inter 1 s, fall 2) notice a failing /ready within
# ~2 s; until then it still sends this replica work, which is served rather than refused: an L7
# retry of a refusal lands on the same replica while it is up (consistent hashing)
DEFAULT_GRACE_S = 3.0

Grace = Annotated[
    float,
    Query(ge=0, le=600, description="seconds new generations are still served while proxies notice"),
]


@router.post("")
async def drain(services: ServicesDep, grace: Grace = DEFAULT_GRACE_S) -> DrainState:
    """Into maintenance (idempotent; a second call keeps the first grace): poll `GET /admin/drain`
    until `drained` is true."""
    if not services.lifecycle.is_in_maintenance:
        services.lifecycle.start_maintenance(grace)
        log.warning(
            "maintenance drain: %d request(s) in flight, new generations refused in %.1f s",
            services.lifecycle.num_in_flight,
            grace,
        )
    return drain_state(services)


@router.delete("", responses={409: {"model": ErrorBody, "description": "Shutting down: cannot be undrained"}})
async def undrain(services: ServicesDep) -> DrainState:
    """Back into rotation (idempotent); a proxy sends work again once `/ready` passes its checks."""
    if services.lifecycle.is_stopping:
        raise ApiError(409, "shutting_down", "the server is shutting down (SIGTERM); it cannot be undrained")
    if services.lifecycle.is_in_maintenance:
        services.lifecycle.is_in_maintenance = False
        log.warning("maintenance drain ended: taking new generations")
    return drain_state(services)
