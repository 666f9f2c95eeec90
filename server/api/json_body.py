"""JSON bodies parsed so that none holds the event loop: small ordinary ones inline (collector
paused), large or suspicious ones (see `json_isolated.is_off_loop`) in a helper process."""

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.api.json_isolated import is_off_loop, loads_json, parse_checked, pool, stop_pool, unpack

log = logging.getLogger(__name__)


async def start_json_helper() -> None:
    """Spawn the helper process now (a spawn takes ~0.5 s) rather than on the first suspicious body."""
    await asyncio.get_running_loop().run_in_executor(pool(), parse_checked, b"{}")


def stop_json_helper() -> None:
    stop_pool()


async def _parse_isolated(body: bytes) -> object:
    try:
        kind, payload = await asyncio.get_running_loop().run_in_executor(pool(), parse_checked, body)
    except BrokenProcessPool:  # the helper died (killed, out of memory): the next body gets a new one
        log.warning("the JSON helper process died; restarting it")
        stop_pool()
        raise json.JSONDecodeError("the body could not be parsed", "", 0) from None
    return unpack(kind, payload, body)


class _Request(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if is_off_loop(body):
                self._json = await _parse_isolated(body)
            else:
                self._json = loads_json(body)
        return self._json


class JSONBodyRoute(APIRoute):
    """An `APIRoute` whose JSON body is parsed as above (FastAPI calls `request.json()`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_Request(request.scope, request.receive))

        return route
