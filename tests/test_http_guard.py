"""The rate-limited log filter used for accept errors, refused connections and dropped streams."""

import logging

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
