"""Schemathesis over the server's own OpenAPI schema, against a real `prefix-serve` process.

What it proves: for a bounded, reproducible (derandomized) set of generated requests to every
operation in `/openapi.json`, sent with the admin token, the server never answers 5xx, answers only
statuses the schema documents, and every answer has a documented content type and matches its
documented schema (SSE events included). Two schemathesis phases run: `coverage` (valid and invalid
values of each field and parameter at their boundaries, unknown methods) and `fuzzing` (random valid
requests, `MAX_EXAMPLES` per operation). Fuzzed generation bodies are steered to the uploaded task
`t:good` within the server's token limit, so their sampling values, prompts and stop strings reach the
engine instead of stopping at "unknown task"; half of the fuzzed task-id path parameters are too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, HookContext
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Adapter

GOOD_TASK = "t:good"
TASK_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_EXAMPLES = 50  # per operation, fuzzing phase; the coverage phase adds its own fixed set
MAX_NEW_TOKENS = 16  # the server's --max-new-tokens: fuzzed generations stay cheap

# Fields of /v1/completions the server refuses (400) whatever their value (see schemas_openai.py).
_REFUSED_OPENAI_FIELDS = ("echo", "best_of", "logit_bias", "suffix")
# The path parameter naming a task, per operation. DELETE and PUT are left alone: steering them
# would delete or overwrite `t:good` on most examples.
_PATH_TASK_PARAM = {
    ("GET", "/admin/prefixes/{task_id}"): "task_id",
    ("POST", "/admin/prefixes/{task_id}/warm"): "task_id",
    ("GET", "/v1/models/{model}"): "model",
}

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


def _upload_good(server: ServerProcess, adapter: Adapter) -> None:
    with httpx.Client(timeout=30) as client:
        response = upload_adapter(client, server, GOOD_TASK, adapter.weights, adapter.config)
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def fuzz_server(
    gpt2_dir: Path, adapter: Adapter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The tiny GPT-2 with embedded Redis; short generations keep fuzzed requests cheap."""
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    flags = ["--model", str(gpt2_dir), "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-model-len", "256"]
    flags += ["--docs", "true"]  # the schema comes from /openapi.json
    with ServerProcess(data_dir, *flags) as server:
        _upload_good(server, adapter)
        yield server


def _is_task_id(value: object) -> bool:
    return isinstance(value, str) and TASK_ID_RE.fullmatch(value) is not None


def _capped(value: object) -> object:
    """A positive token count (JSON allows `3.0`) capped at the server's limit; anything else as is."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
        return value
    if isinstance(value, float) and not value.is_integer():
        return value
    return min(int(value), MAX_NEW_TOKENS)


def _runnable_generate(body: dict[str, Any]) -> dict[str, Any]:
    """The body on `t:good`, within the token limit, with one kind of prompt: it can reach the engine."""
    runnable = {**body, "task_id": GOOD_TASK, "max_new_tokens": _capped(body.get("max_new_tokens", 1))}
    if runnable.get("prompt") is not None:
        runnable.pop("input_ids", None)
    elif runnable.get("input_ids") is None:
        runnable["prompt"] = "Hello"
    return runnable


def _runnable_completion(body: dict[str, Any]) -> dict[str, Any]:
    runnable = {k: v for k, v in body.items() if k not in _REFUSED_OPENAI_FIELDS}
    return {**runnable, "model": GOOD_TASK, "max_tokens": _capped(body.get("max_tokens", 1))}


_RUNNABLE_BODY = {
    ("POST", "/generate"): ("task_id", _runnable_generate),
    ("POST", "/v1/completions"): ("model", _runnable_completion),
}


def _route(context: HookContext) -> tuple[str, str]:
    operation = context.operation
    return ("", "") if operation is None else (operation.method.upper(), operation.path)


def _steer_body(context: HookContext, body: Any) -> Any:
    """A generated body that names a well-formed task id, made to run on `t:good`.

    Random ids only ever reach "unknown task" (the coverage phase still sends those); steered, the
    fuzzed sampling values, prompts and stop strings reach the engine. A body that is negative
    through its id is left as it is.
    """
    steering = _RUNNABLE_BODY.get(_route(context))
    if steering is None or not isinstance(body, dict) or not _is_task_id(body.get(steering[0])):
        return body
    return steering[1](body)


def _steer_path(context: HookContext, path_parameters: dict[str, Any]) -> st.SearchStrategy[Any]:
    key = _PATH_TASK_PARAM.get(_route(context))
    if key is None or not _is_task_id(path_parameters.get(key)):
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, key: GOOD_TASK}])


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess) -> OpenApiSchema:
    config = schemathesis.Config.from_dict(
        {
            "headers": fuzz_server.admin_headers,
            "request-timeout": 30,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "no-shrink": True},
            "phases": {
                "examples": {"enabled": False},  # the schema has none
                "stateful": {"enabled": False},
                # valid and invalid values of every field and parameter, at their boundaries
                "coverage": {"generation": {"mode": "all"}},
                # then random valid requests (steered to `t:good`): what reaches the engine
                "fuzzing": {"generation": {"mode": "positive", "unique-inputs": True}},
            },
        }
    )
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=config)

    schema.hook("map_body")(_steer_body)
    schema.hook("flatmap_path_parameters")(_steer_path)

    return schema


@pytest.fixture(autouse=True)
def _pytest_node_id_shim(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32.5's `from_fixture` reads and writes `request.node._nodeid`, which pytest 9.2
    renamed (`Node._id`, a `NodeId`); give it the string back. Only the subtest labels use it."""
    if not hasattr(request.node, "_nodeid"):
        setattr(request.node, "_nodeid", request.node.nodeid)  # noqa: B010


schema = schemathesis.pytest.from_fixture("api_schema")


@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: keep it bounded
    suppress_health_check=list(hypothesis.HealthCheck),
)
@schema.parametrize()
def test_openapi_fuzz(case: Case, fuzz_server: ServerProcess, adapter: Adapter) -> None:
    response = case.call_and_validate(checks=CHECKS)
    deleted_good = case.method.upper() == "DELETE" and case.path_parameters.get("task_id") == GOOD_TASK
    if deleted_good and response.status_code == 204:
        _upload_good(fuzz_server, adapter)  # keep the task that steered requests rely on
