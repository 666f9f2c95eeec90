"""Python client (sync + async) of the prefix server, and the `prefixctl` CLI (`clients.cli`)."""

from clients.client import AsyncPrefixClient, PrefixClient, Sampling
from clients.models import (
    CreatedKey,
    Generation,
    KeyInfo,
    PrefixInfo,
    PrefixPage,
    PrefixServerError,
    StreamEvent,
)

__all__ = [
    "AsyncPrefixClient",
    "CreatedKey",
    "Generation",
    "KeyInfo",
    "PrefixClient",
    "PrefixInfo",
    "PrefixPage",
    "PrefixServerError",
    "Sampling",
    "StreamEvent",
]
