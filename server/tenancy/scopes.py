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


def scope_ranges(scopes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """What to read to list the tasks of `scopes`: the task-id prefixes of its patterns (none
    covered by another) and its exact ids that no pattern covers.

    `("acme:*", "acme:x", "beta:y")` -> `(["acme:"], ["beta:y"])`; `("*",)` -> `([""], [])`.
    """
    prefixes: list[str] = []
    for prefix in sorted({s[:-1] for s in scopes if s.endswith("*")}):
        if not any(prefix.startswith(kept) for kept in prefixes):
            prefixes.append(prefix)
    exact = {s for s in scopes if not s.endswith("*")}
    return prefixes, sorted(s for s in exact if not any(s.startswith(p) for p in prefixes))
