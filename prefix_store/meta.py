"""The one definition of a stored prefix's metadata, shared by the store, the HTTP API (as its
response schema) and the Python client. Torch-free, so the API layer and the client can import it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixMeta:
    """Metadata stored beside every prefix version (and what `GET /admin/prefixes/{id}` answers)."""

    task_id: str
    version: int  # 1, 2, ...: a re-upload makes a new version
    prefix_len: int  # virtual tokens (positions) the prefix occupies
    num_bytes: int
    dtype: str  # torch dtype name without the "torch." part, e.g. "float32"
    model_fingerprint: str  # the frozen model it belongs to
    created_at: str  # ISO 8601, UTC
    source: str = "kv"  # kv | prefix_tuning | cartridge | prompt_tuning | p_tuning | text


@dataclass(frozen=True)
class WarmedPrefix(PrefixMeta):
    """`POST /admin/prefixes/{id}/warm`: the metadata and the cache tiers now holding the prefix."""

    tiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResidentPrefix:
    """One prefix resident in a cache tier (a row of `GET /admin/cache`)."""

    tier: str  # device | host
    task_id: str
    version: int
    prefix_len: int
    num_bytes: int
    is_pinned: bool  # a request in flight holds it: never evicted for space
