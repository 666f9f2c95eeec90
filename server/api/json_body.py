"""JSON bodies parsed without the cyclic garbage collector running hundreds of times meanwhile."""

import gc
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def loads_json(body: bytes) -> Any:
    """`json.loads` with the collector paused: a 1 MB body of 340,000 `[]` allocates 340,000
    containers, which would set off ~500 collections (2x the parse time). `json.loads` holds the GIL
    throughout, so no other thread runs while the collector is off."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(body)
    finally:
        if was_enabled:
            gc.enable()


class _Request(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_json(await self.body())
        return self._json


class JSONBodyRoute(APIRoute):
    """An `APIRoute` whose JSON body is parsed by `loads_json` (FastAPI calls `request.json()`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_Request(request.scope, request.receive))

        return route
