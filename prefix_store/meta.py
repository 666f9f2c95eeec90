"""The one definition of each record the server stores and answers (a prefix's metadata, a cache
tier's usage, a tenant API key), shared by the store, the server, the HTTP API (as its response
schemas) and the Python client. Torch-free, so the API layer and the client can import it."""

from dataclasses import dataclass, field, fields


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


@dataclass(frozen=True)
class TierUsage:
    """One cache tier's capacity and what it holds (`GET /admin/cache`'s `tiers`)."""

    capacity_bytes: int
    resident_bytes: int
    resident_prefixes: int


@dataclass(frozen=True)
class ApiKey:
    """A tenant API key's record (never its secret): who it is, the tasks it may use (task ids or
    `prefix*` patterns) and its rate limits (0 = unlimited). `GET /admin/keys` lists these."""

    id: str
    name: str
    scopes: tuple[str, ...]
    requests_per_second: float
    tokens_per_minute: int
    created_at: str


@dataclass(frozen=True)
class CreatedKey(ApiKey):
    """The answer of `POST /admin/keys`: the key's record and its secret `key`, shown this once only
    (kept out of `repr` so it does not end up in logs)."""

    key: str = field(repr=False)

    @property
    def info(self) -> ApiKey:
        """The key without its secret, as listing and revoking return it."""
        return ApiKey(**{f.name: getattr(self, f.name) for f in fields(ApiKey)})
