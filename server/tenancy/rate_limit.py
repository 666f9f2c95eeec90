"""Per-key token buckets in Redis, so a key's limits hold across every replica.

Two buckets per key: requests (refills `requests_per_second`, holds one second's worth, at
least 1) and tokens, prompt and generated alike (refills `tokens_per_minute / 60` per second,
holds a minute's worth). A request needs one request token, and holds the most tokens it may
generate (`max_tokens x n x prompts`) from the token bucket at admission, atomically, so a
key can never receive more than its bucket holds. When the request ends the hold is released
and what was really generated is charged (`charge`), so the unused part comes back; its
prompt tokens are charged once it is queued (the caller knows them only then). A
request whose hold exceeds the whole bucket can never be admitted (`Admission.can_ever_fit`).
A request that holds nothing (`num_tokens=0`) only needs a non-negative balance. Time is
Redis's clock (`TIME`), the same for every replica. Both buckets of a key share the hash tag
`{<key id>}`: one Cluster slot per key, so each script touches one slot (keys spread over
the primaries).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from infra.connection import RedisClient
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

# ARGV: requests/s, its capacity, tokens/s, its capacity (a rate of 0 = unlimited), tokens to hold.
# Returns 0 (admitted; one request token taken, the tokens held) or the milliseconds to wait.
_ADMIT_SCRIPT = (
    _REFILL
    + """
local rps, rcap, tps, tcap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local hold = tonumber(ARGV[5])
local wait = 0
local req, tok = 0, 0
if rps > 0 then
  req = level(KEYS[1], rps, rcap)
  if req < 1 then wait = (1 - req) / rps end
end
if tps > 0 then
  tok = level(KEYS[2], tps, tcap)
  if tok < hold then wait = math.max(wait, (hold - tok) / tps) end
end
if wait > 0 then return math.max(1, math.ceil(wait * 1000)) end
if rps > 0 then save(KEYS[1], req - 1, rps, rcap) end
if tps > 0 and hold > 0 then save(KEYS[2], tok - hold, tps, tcap) end
return 0
"""
)

# ARGV: tokens/s, capacity, tokens generated (negative: a hold given back). Returns nothing.
_CHARGE_SCRIPT = (
    _REFILL
    + """
local tps, tcap, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
save(KEYS[1], level(KEYS[1], tps, tcap) - n, tps, tcap)
return 0
"""
)


_SHA1 = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_ADMIT_SCRIPT, _CHARGE_SCRIPT)}


@dataclass(frozen=True)
class Admission:
    """The answer for one request: admitted (holding `num_held` tokens until `release`), or how
    long to wait before trying again, or (`can_ever_fit` False) never: the hold exceeds the bucket."""

    is_admitted: bool
    retry_after_s: int = 0
    num_held: int = 0
    can_ever_fit: bool = True


class RateLimiter:
    """Admit requests, hold and charge generated tokens against each key's buckets."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self.num_errors = 0

    async def _run(self, script: str, keys: list[str], args: list[float | int]) -> Any:
        """EVALSHA, and EVAL where the key's node does not know the script yet (a restarted or
        promoted node). Not redis-py's `register_script`: on a Cluster it would load a missing
        script on every primary, and one dead primary would then fail every key's limits."""
        digest = _SHA1[script]
        try:
            return await self._client.evalsha(digest, len(keys), *keys, *args)
        except NoScriptError:
            return await self._client.eval(script, len(keys), *keys, *args)

    async def admit(self, key: ApiKey, num_tokens: int = 0, take_request: bool = True) -> Admission:
        """Take one request token (unless `take_request` is False: more tokens for a request admitted
        already) and hold `num_tokens` (the most the request may generate); fails open (admits,
        holding nothing) when Redis cannot be reached."""
        tpm = key.tokens_per_minute
        if tpm > 0 and num_tokens > tpm:
            return Admission(False, can_ever_fit=False)
        rps = key.requests_per_second if take_request else 0.0
        if rps <= 0 and tpm <= 0:
            return Admission(True)
        hold = max(0, num_tokens) if tpm > 0 else 0
        args = [rps, max(1.0, rps), tpm / 60, tpm, hold]
        try:
            wait_ms = int(await self._run(_ADMIT_SCRIPT, _bucket_keys(key.id), args))
        except REDIS_ERRORS as exc:
            self.num_errors += 1
            log.warning("rate limit of key %s not checked (redis: %s): admitting", key.id, exc)
            return Admission(True)
        if wait_ms == 0:
            return Admission(True, num_held=hold)
        return Admission(False, max(1, math.ceil(wait_ms / 1000)))

    async def release(self, key: ApiKey, num_held: int) -> None:
        """Give back a hold taken by `admit` (the request's real tokens are `charge`d); never raises."""
        await self.charge(key, -num_held)

    async def charge(self, key: ApiKey, num_tokens: int) -> None:
        """Take `num_tokens` generated tokens from the key's balance (never raises; negative
        gives tokens back, never beyond the bucket's capacity)."""
        if key.tokens_per_minute <= 0 or num_tokens == 0:
            return
        args = [key.tokens_per_minute / 60, key.tokens_per_minute, num_tokens]
        try:
            await self._run(_CHARGE_SCRIPT, _bucket_keys(key.id)[1:], args)
        except REDIS_ERRORS as exc:
            self.num_errors += 1
            log.warning("could not charge %d tokens to key %s: %s", num_tokens, key.id, exc)


def _bucket_keys(key_id: str) -> list[str]:
    # one hash tag per key: both buckets live in one Redis Cluster slot
    return [f"pfx:ratelimit:{{{key_id}}}:requests", f"pfx:ratelimit:{{{key_id}}}:tokens"]
