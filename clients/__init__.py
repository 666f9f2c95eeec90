"""Python client (sync + async) of the prefix server, and the `prefixctl` CLI (`clients.cli`)."""

from clients.async_client import AsyncPrefixClient
from clients.calls import ChatSampling, Message, Sampling
from clients.client import PrefixClient
from clients.models import (
    ChatChunk,
    ChatCompletion,
    CreatedKey,
    DrainState,
    Generation,
    KeyInfo,
    PrefixInfo,
    PrefixPage,
    PrefixServerError,
    StreamEvent,
)

__all__ = [
    "AsyncPrefixClient",
    "ChatChunk",
    "ChatCompletion",
    "ChatSampling",
    "CreatedKey",
    "DrainState",
    "Generation",
    "KeyInfo",
    "Message",
    "PrefixClient",
    "PrefixInfo",
    "PrefixPage",
    "PrefixServerError",
    "Sampling",
    "StreamEvent",
]
