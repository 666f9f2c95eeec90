"""Work a request starts that must finish even if the request does not (its client left)."""

import asyncio
from collections.abc import Awaitable

_background: set[asyncio.Future[None]] = set()  # strong references: the loop keeps only weak ones


def in_background(work: Awaitable[None]) -> None:
    """Run `work` to its end even while the request's own task is being cancelled."""
    future = asyncio.ensure_future(work)
    _background.add(future)
    future.add_done_callback(_background.discard)
