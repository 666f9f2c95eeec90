"""How an engine ending becomes an HTTP answer: exact statuses, codes and Retry-After."""

import pytest

from server.api.outputs import ended_error
from server.engine.request import StepOutput


@pytest.mark.parametrize(
    ("reason", "error", "expected"),
    [
        ("timeout", "too slow", (504, "timeout", {})),
        ("shutdown", "bye", (500, "interrupted", {"Retry-After": "1"})),  # after work: never a 503
        ("shed", "queue full", (429, "overloaded", {"Retry-After": "1"})),
        ("error", "non-finite logits", (500, "internal", {})),
        ("abort", None, (500, "internal", {})),
    ],
)
def test_failed_endings(reason: str, error: str | None, expected: tuple[int, str, dict[str, str]]) -> None:
    answer = ended_error(StepOutput("r", [], "", reason, error=error))  # type: ignore[arg-type]
    assert answer is not None and (answer.status, answer.code, answer.headers) == expected


@pytest.mark.parametrize("reason", [None, "length", "stop", "eos"])
def test_tokens_and_normal_endings_are_not_errors(reason: str | None) -> None:
    assert ended_error(StepOutput("r", [1], "x", reason)) is None  # type: ignore[arg-type]
