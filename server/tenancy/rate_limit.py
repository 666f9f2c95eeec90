"""Per-key token buckets in Redis, so a key's limits hold across every replica.

Two buckets per key: requests (refills `requests_per_second`, holds one second's worth, at
least 1) and generated tokens (refills `tokens_per_minute / 60` per second, holds a
minute's worth). A request needs one request token and a non-negative token balance; its
generated tokens are charged when it ends, so a long generation can leave the balance
negative and later requests wait until it refills. Time is Redis's clock (`TIME`), the
same for every replica.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import redis.asyncio

from prefix_store.redis_store import REDIS_ERRORS
from server.tenancy.keys import ApiKey

log = logging.getLogger(__name__)

# Shared by both scripts: the refilled level of bucket KEYS[i] (absent -> full).
_REFILL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, rate, capacity)
  local v = redis.call('HMGET', key, 'level', 'at')
  local lvl = tonumber(v[1]) or capacity
  local at = tonumber(v[2]) or now
  return math.min(capacity, lvl + math.max(0, now - at) * rate)
end
local function save(key, lvl, rate, capacity)
  redis.call('HSET', key, 'level', tostring(lvl), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(1000 * (capacity - math.min(lvl, 0)) / rate) + 60000)
end
"""

# ARGV: requests/s, its capacity, tokens/s, its capacity (a rate of 0 = unlimited).
# Returns 0 (admitted; one request token taken) or the milliseconds to wait.
_ADMIT_SCRIPT = (
    _REFILL
    + """
local rps, rcap, tps, tcap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local wait = 0
local req = 0
if rps > 0 then
  req = level(KEYS[1], rps, rcap)
  if req < 1 then wait = (1 - req) / rps end
end
if tps > 0 then
  local tok = level(KEYS[2], tps, tcap)
  if tok < 0 then wait = math.max(wait, -tok / tps) end
end
if wait > 0 then return math.max(1, math.ceil(wait * 1000)) end
if rps > 0 then save(KEYS[1], req - 1, rps, rcap) end
return 0
"""
)

# ARGV: tokens/s, capacity, tokens generated. Returns nothing.
_CHARGE_SCRIPT = (
    _REFILL
    + """
local tps, tcap, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
save(KEYS[1], level(KEYS[1], tps, tcap) - n, tps, tcap)
return 0
"""
)


@dataclass(frozen=True)
class Admission:
    """The answer for one request: admitted, or how long to wait before trying again."""

    is_admitted: bool
    retry_after_s: int = 0


class RateLimiter:
    """Admit requests and charge generated tokens against each key's buckets."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._admit = client.register_script(_ADMIT_SCRIPT)
        self._charge = client.register_script(_CHARGE_SCRIPT)
        self.num_errors = 0

    async def admit(self, key: ApiKey) -> Admission:
        """Take one request token; fails open (admits) when Redis cannot be reached."""
        if key.requests_per_second <= 0 and key.tokens_per_minute <= 0:
            return Admission(True)
        rps = key.requests_per_second
        args = [rps, max(1.0, rps), key.tokens_per_minute / 60, key.tokens_per_minute]
        try:
            wait_ms = int(await self._admit(keys=_bucket_keys(key.id), args=args))
        except REDIS_ERRORS as exc:
            self.num_errors += 1
            log.warning("rate limit of key %s not checked (redis: %s): admitting", key.id, exc)
            return Admission(True)
        if wait_ms == 0:
            return Admission(True)
        return Admission(False, max(1, math.ceil(wait_ms / 1000)))

    async def charge(self, key: ApiKey, num_tokens: int) -> None:
        """Take `num_tokens` generated tokens from the key's balance (never raises)."""
        if key.tokens_per_minute <= 0 or num_tokens <= 0:
            return
        args = [key.tokens_per_minute / 60, key.tokens_per_minute, num_tokens]
        try:
            await self._charge(keys=_bucket_keys(key.id)[1:], args=args)
        except REDIS_ERRORS as exc:
            self.num_errors += 1
            log.warning("could not charge %d tokens to key %s: %s", num_tokens, key.id, exc)


def _bucket_keys(key_id: str) -> list[str]:
    # one hash tag per key: both buckets live in one Redis Cluster slot
    return [f"pfx:ratelimit:{{{key_id}}}:requests", f"pfx:ratelimit:{{{key_id}}}:tokens"]
