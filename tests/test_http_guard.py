"""The rate-limited log filter used for accept errors, refused connections and dropped streams."""

import logging

from server.http_conn import ConnectionLimits
from server.http_guard import RateLimitedRecords


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("x", logging.WARNING, __file__, 0, msg, None, None)


def test_one_record_per_interval_then_the_count_of_those_held_back() -> None:
    limit = RateLimitedRecords(("refused",), interval_s=3600)
    first = _record("refused a connection")
    assert limit.filter(first) and first.msg == "refused a connection"
    assert [limit.filter(_record("refused a connection")) for _ in range(5)] == [False] * 5
    assert limit.filter(_record("something else"))  # other messages always pass
    limit._last = -float("inf")  # the interval has passed
    later = _record("refused a connection")
    assert limit.filter(later) and later.msg == "refused a connection (5 more since the last report)"


def test_trusted_proxies_are_addresses_networks_or_everyone() -> None:
    limits = ConnectionLimits(trusted_proxies=frozenset({"10.0.0.7", "192.168.0.0/16"}))
    assert limits.is_trusted("10.0.0.7") and limits.is_trusted("192.168.4.2")
    assert not limits.is_trusted("10.0.0.8") and not limits.is_trusted("not-an-ip")
    assert not ConnectionLimits().is_trusted("127.0.0.1")  # none by default
    assert ConnectionLimits(trusted_proxies=frozenset({"*"})).is_trusted("203.0.113.9")
