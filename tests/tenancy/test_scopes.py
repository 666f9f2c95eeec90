"""Scope patterns: exact expectations."""

import pytest

from server.tenancy.scopes import is_in_scope, is_valid_scope, scope_ranges


@pytest.mark.parametrize(
    ("task_id", "scopes", "expected"),
    [
        ("acme:sum", ("acme:*",), True),
        ("acme:sum", ("acme:sum",), True),
        ("acme:summary", ("acme:sum",), False),  # an exact id is not a prefix
        ("acme", ("acme:*",), False),
        ("acmeco:x", ("acme:*",), False),
        ("beta:x", ("acme:*", "beta:x"), True),
        ("anything", ("*",), True),
        ("acme:sum", (), False),
    ],
)
def test_is_in_scope(task_id: str, scopes: tuple[str, ...], expected: bool) -> None:
    assert is_in_scope(task_id, scopes) is expected


@pytest.mark.parametrize(
    ("scope", "expected"),
    [("acme:*", True), ("*", True), ("a.b_c-d:e", True), ("acme/*", False), ("a*b", False), ("", False)],
)
def test_is_valid_scope(scope: str, expected: bool) -> None:
    assert is_valid_scope(scope) is expected


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        (("acme:*", "acme:x", "beta:y"), (["acme:"], ["beta:y"])),
        (("*", "acme:*"), ([""], [])),
        (("a:x", "a:x*"), (["a:x"], [])),  # the pattern covers the exact id
        (("a:x", "a:xy*"), (["a:xy"], ["a:x"])),  # an exact id covers nothing else
        (("b:2", "b:1"), ([], ["b:1", "b:2"])),
    ],
)
def test_scope_ranges(scopes: tuple[str, ...], expected: tuple[list[str], list[str]]) -> None:
    assert scope_ranges(scopes) == expected
