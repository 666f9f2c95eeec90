"""Tenant API keys in Redis, shared by every replica.

Layout (not namespaced by model: a tenant's key is valid whatever model a replica serves):

- `pfx:apikey:<sha256 of the secret>`: hash with the key's record (never the secret itself).
- `pfx:apikeys`: hash, key id -> sha256 (for listing and revoking by id).
- `pfx:apikeys:enabled`: set once the first key is created and never unset, so revoking
  every key leaves the server closed rather than silently open.

Each record has its own slot on a Redis Cluster (no hash tag), so lookups spread over the
primaries; the three kinds of keys live in different slots, so writes are ordered instead of
transactional: create writes the record before indexing it (a crash in between leaves an
unlisted record whose secret nobody was shown), revoke deletes the record first (refused at
once) and then its index entry.

Every request reads its key's record from Redis, so a revocation holds on every replica at
once. If Redis cannot be reached, keys that were valid at their last successful read keep
working (the server keeps serving resident tasks through a Redis outage).

Each record carries an HMAC over its sha256 and its fields, keyed by a secret derived from the
admin token (every replica of one deployment shares it, and it is never stored in Redis): a
record written straight into Redis, behind the server's back, is refused and logged. Changing
the admin token therefore retires every key (create new ones).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections import OrderedDict
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from infra.connection import RedisClient
from prefix_store.errors import StoreUnavailable
from prefix_store.meta import ApiKey
from prefix_store.redis_store import REDIS_ERRORS, unavailable
from prefix_store.replies import as_text

_RECORD_PREFIX = "pfx:apikey:"
_INDEX_KEY = "pfx:apikeys"
_ENABLED_KEY = "pfx:apikeys:enabled"
_MAC_CONTEXT = b"prefix-server api-key records v1"

log = logging.getLogger(__name__)


def hash_secret(secret: str) -> str:
    """Keys are 256-bit random secrets, so one unsalted SHA-256 is a safe, fast lookup hash."""
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """Create, list, revoke and look up API keys.

    `mac_secret` (the admin token) keys the records' HMAC. `is_known` stays False until the
    key store has been read once: until then nobody can tell "no keys" from "could not read".
    """

    def __init__(self, client: RedisClient, mac_secret: str, max_remembered: int = 10_000) -> None:
        self._client = client
        self._mac_key = hmac.new(_MAC_CONTEXT, mac_secret.encode(), hashlib.sha256).digest()
        self._last_good: OrderedDict[str, ApiKey | None] = OrderedDict()  # sha256 -> record
        self._max_remembered = max_remembered
        self.is_known = False  # set by the first successful `refresh()`; never unset
        self.is_enabled = False  # refreshed by `refresh()`; once True it stays True
        self.num_errors = 0
        self.num_forged = 0  # records refused for a missing or wrong MAC

    async def create(
        self, name: str, scopes: tuple[str, ...], requests_per_second: float, tokens_per_minute: int
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once; only its hash is stored)."""
        secret = "pk-" + secrets.token_urlsafe(32)
        created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        key = ApiKey(
            "key_" + secrets.token_hex(8), name, scopes, requests_per_second, tokens_per_minute, created_at
        )
        digest = hash_secret(secret)
        async with unavailable(self, "create key"):
            await self._client.set(_RECORD_PREFIX + digest, self._seal(digest, key))
            await self._client.hset(_INDEX_KEY, key.id, digest)
            await self._client.set(_ENABLED_KEY, 1)
        self.is_enabled = True
        return key, secret

    async def list(self) -> list[ApiKey]:
        """Every key, oldest first."""
        async with unavailable(self, "list keys"):
            digests = [as_text(d) for d in (await self._client.hgetall(_INDEX_KEY)).values()]
            pipe = self._client.pipeline(transaction=False)  # not MGET: records span Cluster slots
            for digest in digests:
                pipe.get(_RECORD_PREFIX + digest)
            raw = await pipe.execute() if digests else []
        opened = (self._open(d, r) for d, r in zip(digests, raw, strict=True) if r is not None)
        return sorted((k for k in opened if k is not None), key=lambda k: (k.created_at, k.id))

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Delete the key; its record, or None if there was none. Holds from the next request on,
        on every replica."""
        async with unavailable(self, "revoke key"):
            digest = await self._client.hget(_INDEX_KEY, key_id)
            if digest is None:
                return None
            raw = await self._client.getdel(_RECORD_PREFIX + as_text(digest))
            await self._client.hdel(_INDEX_KEY, key_id)
        self._last_good[as_text(digest)] = None  # refused even while Redis is unreachable
        return None if raw is None else self._open(as_text(digest), raw)

    async def lookup(self, secret: str) -> ApiKey | None:
        """The key with this secret, or None. Redis down: the last record read for it, if any."""
        digest = hash_secret(secret)
        try:
            raw = await self._client.get(_RECORD_PREFIX + digest)
        except REDIS_ERRORS:
            self.num_errors += 1
            if digest in self._last_good:
                return self._last_good[digest]
            raise StoreUnavailable("redis is unreachable and this key was not seen before") from None
        key = None if raw is None else self._open(digest, raw)
        self._remember(digest, key)
        return key

    async def refresh(self) -> None:
        """Learn whether keys are configured (another replica may have created the first one);
        a failed read leaves `is_known` as it was, never "no keys"."""
        if self.is_enabled:
            return
        try:
            self.is_enabled = bool(await self._client.exists(_ENABLED_KEY))
        except REDIS_ERRORS:
            self.num_errors += 1
            return
        self.is_known = True

    def _mac(self, digest: str, fields: dict[str, Any]) -> str:
        message = digest.encode() + b"\n" + json.dumps(fields, sort_keys=True).encode()
        return hmac.new(self._mac_key, message, hashlib.sha256).hexdigest()

    def _seal(self, digest: str, key: ApiKey) -> str:
        """The stored record: the key's fields and their MAC (bound to this secret's hash)."""
        fields = asdict(key)
        return json.dumps({**fields, "mac": self._mac(digest, fields)})

    def _open(self, digest: str, raw: bytes | str) -> ApiKey | None:
        """The record's key if its MAC holds; None (and a warning) for a record the server did not write."""
        try:
            fields = json.loads(raw)
            mac = str(fields.pop("mac", ""))
            if hmac.compare_digest(mac, self._mac(digest, fields)):
                return _parse(fields)
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
        self.num_forged += 1
        log.warning(
            "refused API key record %s%s...: missing or wrong MAC (written outside this server, "
            "or under another admin token)",
            _RECORD_PREFIX,
            digest[:12],
        )
        return None

    def _remember(self, digest: str, key: ApiKey | None) -> None:
        self._last_good[digest] = key
        self._last_good.move_to_end(digest)
        while len(self._last_good) > self._max_remembered:
            self._last_good.popitem(last=False)


def _parse(fields: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=fields["id"],
        name=fields["name"],
        scopes=tuple(fields["scopes"]),
        requests_per_second=float(fields["requests_per_second"]),
        tokens_per_minute=int(fields["tokens_per_minute"]),
        created_at=fields["created_at"],
    )
