"""Key scopes: which task ids an API key may use. Pure functions, tested exactly."""

import re

# A scope is a task id (exact) or a task-id prefix followed by `*` (`acme:*`; `*` alone is every task).
SCOPE_PATTERN = r"^[A-Za-z0-9._:-]{0,127}\*$|^[A-Za-z0-9._:-]{1,128}$"
_SCOPE_RE = re.compile(SCOPE_PATTERN)


def is_valid_scope(scope: str) -> bool:
    return bool(_SCOPE_RE.match(scope))


def is_in_scope(task_id: str, scopes: tuple[str, ...]) -> bool:
    """True when some scope names `task_id` exactly or is a prefix pattern it starts with."""
    return any(task_id.startswith(s[:-1]) if s.endswith("*") else task_id == s for s in scopes)


def scope_prefixes(scopes: tuple[str, ...]) -> list[str]:
    """The task-id prefixes to list for `scopes` (exact ids are prefixes too), none covered by another.

    `("acme:*", "acme:x", "beta:y")` -> `["acme:", "beta:y"]`; `("*",)` -> `[""]`.
    """
    prefixes = sorted({s[:-1] if s.endswith("*") else s for s in scopes})
    exact = {s for s in scopes if not s.endswith("*")}
    kept: list[str] = []
    for prefix in prefixes:
        # an exact id only matches itself, so it is covered by a pattern, never covers one
        if not any(prefix.startswith(k) and k not in exact for k in kept):
            kept.append(prefix)
    return kept
