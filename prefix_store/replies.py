"""Redis replies as text, whichever way the client was built (`decode_responses` or not)."""


def as_text(value: bytes | str) -> str:
    """A reply as `str`; bytes that are not UTF-8 read with replacement characters, never raise."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
