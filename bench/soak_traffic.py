"""The soak's traffic: the operations a client picks from (generations, streamed or not, cancellations,
bad requests, admin uploads and reads), the bad-request cases and the per-tenant API keys."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import safetensors.torch
import torch

from bench.soak_checks import (
    CANCELLED,
    OK,
    Ctx,
    Lost,
    Mismatch,
    check_completion_usage,
    check_generation,
    check_stable_version,
    expect_status,
    get,
    json_of,
    merge_completion_chunks,
    merge_generate_events,
    stream,
)
from bench.soak_workload import (
    GREEDY,
    MAX_NEW_LIMIT,
    MAX_POSITIONS,
    MAX_UPLOAD_BYTES,
    TENANTS,
    BadCase,
    PromptSpec,
    Sampling,
    TaskSpec,
    canonical_prefix,
    random_text,
    sampled,
)

# ---- operations (each returns its outcome and HTTP status, or raises Mismatch / Lost) -------------
Op = Callable[[Ctx, random.Random], Awaitable[tuple[str, int]]]


def pick(ctx: Ctx, rng: random.Random, stable_only: bool = False) -> tuple[TaskSpec, int, PromptSpec]:
    task = rng.choice(ctx.stable if stable_only else ctx.tasks)
    index = rng.randrange(len(ctx.prompts))
    return task, index, ctx.prompts[index]


def generate_body(
    task: TaskSpec, prompt: PromptSpec, sampling: Sampling, rng: random.Random, **extra: Any
) -> dict[str, Any]:
    """A `/generate` body; the prompt as text or as its token ids (the same request)."""
    body = {"task_id": task.task_id, "max_new_tokens": prompt.max_new, **sampling.body(), **extra}
    if rng.random() < 0.5:
        body["prompt"] = prompt.text
    else:
        body["input_ids"] = list(prompt.ids)
    return body


def completion_body(
    task: TaskSpec, prompt: PromptSpec, sampling: Sampling, rng: random.Random
) -> dict[str, Any]:
    prompt_field: str | list[int] = prompt.text if rng.random() < 0.5 else list(prompt.ids)
    body = {"model": task.task_id, "prompt": prompt_field, "max_tokens": prompt.max_new, **sampling.body()}
    if sampling.seed is None:
        del body["seed"]
    return body


async def op_generate(
    ctx: Ctx, rng: random.Random, sampling: Sampling = GREEDY, kind: str = "generate"
) -> tuple[str, int]:
    task, index, prompt = pick(ctx, rng)
    response = await ctx.http.post(
        "/generate", json=generate_body(task, prompt, sampling, rng), headers=ctx.headers_for(task.task_id)
    )
    expect_status(response, 200)
    version, answer = check_generation(ctx, kind, task, prompt, json_of(response), prompt.max_new)
    check_stable_version(ctx, task, version)
    ctx.refs.check((task.task_id, version, index, sampling), answer)
    return OK, 200


async def op_generate_sampled(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    return await op_generate(ctx, rng, sampled(rng), "generate_sampled")


async def op_generate_stream(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    task, index, prompt = pick(ctx, rng)
    sampling = GREEDY if rng.random() < 0.8 else sampled(rng)
    body = generate_body(task, prompt, sampling, rng, stream=True)
    events, is_done = await stream(ctx, "/generate", body)
    if not is_done:
        raise Lost(f"stream ended without [DONE] after {len(events)} events")
    merged = merge_generate_events(events, task)
    version, answer = check_generation(ctx, "generate_stream", task, prompt, merged, prompt.max_new)
    check_stable_version(ctx, task, version)
    ctx.refs.check((task.task_id, version, index, sampling), answer)
    return OK, 200


async def op_completions(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    task, index, prompt = pick(ctx, rng, stable_only=True)  # no prefix_version in OpenAI's answer
    sampling = GREEDY if rng.random() < 0.8 else sampled(rng)
    response = await ctx.http.post(
        "/v1/completions",
        json=completion_body(task, prompt, sampling, rng),
        headers=ctx.headers_for(task.task_id),
    )
    expect_status(response, 200)
    body = json_of(response)
    choices = get(body, "choices", list)
    if body.get("object") != "text_completion" or body.get("model") != task.task_id or len(choices) != 1:
        raise Mismatch(f"unexpected completion {body}")
    answer = check_completion_usage(
        body.get("usage"), prompt, get(choices[0], "text", str), choices[0].get("finish_reason")
    )
    ctx.refs.check((task.task_id, ctx.first_version(task), index, sampling), answer)
    return OK, 200


async def op_completions_stream(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    task, index, prompt = pick(ctx, rng, stable_only=True)
    sampling = GREEDY if rng.random() < 0.8 else sampled(rng)
    body = {
        **completion_body(task, prompt, sampling, rng),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, is_done = await stream(ctx, "/v1/completions", body)
    if not is_done:
        raise Lost(f"stream ended without [DONE] after {len(chunks)} chunks")
    text, finish, usage = merge_completion_chunks(chunks, task)
    answer = check_completion_usage(usage, prompt, text, finish)
    ctx.refs.check((task.task_id, ctx.first_version(task), index, sampling), answer)
    return OK, 200


async def op_cancel_stream(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    """Open a long stream (64 tokens, EOS ignored) and close it after 1-4 events."""
    task, _, prompt = pick(ctx, rng, stable_only=True)
    if rng.random() < 0.5:
        path, body = "/generate", generate_body(task, prompt, GREEDY, rng, stream=True)
        body.update(max_new_tokens=MAX_NEW_LIMIT, ignore_eos=True)
    else:
        path, body = "/v1/completions", completion_body(task, prompt, GREEDY, rng)
        body.update(max_tokens=MAX_NEW_LIMIT, ignore_eos=True, stream=True)
    wanted = rng.randint(1, 4)
    events, is_done = await stream(ctx, path, body, stop_after=wanted)  # leaving closes the connection
    if is_done or len(events) < wanted:
        raise Lost(f"a {MAX_NEW_LIMIT}-token stream ended after {len(events)} events (done: {is_done})")
    return CANCELLED, 200


async def op_cancel_timeout(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    """A non-streamed 64-token request abandoned after a short wait (the client closes the connection)."""
    task, _, prompt = pick(ctx, rng)
    body = generate_body(task, prompt, GREEDY, rng, max_new_tokens=MAX_NEW_LIMIT, ignore_eos=True)
    try:
        response = await asyncio.wait_for(
            ctx.http.post("/generate", json=body, headers=ctx.headers_for(task.task_id)),
            timeout=rng.uniform(0.02, 0.4),
        )
    except TimeoutError:
        return CANCELLED, 0
    expect_status(response, 200)
    check_generation(ctx, "cancel_timeout", task, prompt, json_of(response), MAX_NEW_LIMIT, ignore_eos=True)
    return OK, 200


async def op_admin_upload(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    """A new version of a churn task: a canonical tensor or a text prefix of a random length."""
    task = rng.choice([t for t in ctx.tasks if t.is_churn])
    length = rng.randint(1, 48)
    if rng.random() < 0.5:
        files: Any = {"text": (None, random_text(rng, length).encode())}
    else:
        files = {
            "weights": ("prefix.safetensors", canonical_prefix(ctx.layout, length, rng.randrange(1 << 30)))
        }
    response = await ctx.http.put(f"/admin/prefixes/{task.task_id}", files=files, headers=ctx.admin)
    expect_status(response, 201)
    body = json_of(response)
    if get(body, "task_id", str) != task.task_id or get(body, "prefix_len", int) != length:
        raise Mismatch(f"upload of a {length}-token prefix to {task.task_id} answered {body}", 201)
    ctx.versions.upload(task.task_id, get(body, "version", int), length)
    return OK, 201


async def op_admin_read(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    """The task list names every task the caller may see (admin: all; with keys, /v1/models: exactly
    the tasks of the key's tenant)."""
    expected = {t.task_id for t in ctx.tasks}
    if rng.random() < 0.5:
        response = await ctx.http.get("/admin/prefixes", params={"limit": 100}, headers=ctx.admin)
        key, name = "items", "task_id"
    else:
        tenant = rng.choice(ctx.tasks).task_id.split(":", 1)[0]
        response = await ctx.http.get("/v1/models", headers=ctx.headers_for(f"{tenant}:x"))
        key, name = "data", "id"
        if ctx.keys:
            expected = {t for t in expected if t.startswith(tenant + ":")}
    expect_status(response, 200)
    listed = {item.get(name) for item in get(json_of(response), key, list)}
    missing = expected - listed
    foreign = listed - expected if ctx.keys and key == "data" else set()
    if missing or foreign:
        raise Mismatch(f"{response.request.url.path} misses {sorted(missing)}, shows {sorted(foreign)}", 200)
    return OK, 200


# ---- bad requests -------------------------------------------------------------------------------
def bad_cases(stable: TaskSpec, layout: tuple[int, int, int]) -> list[BadCase]:
    """Each with the exact status and error code the contract gives it."""
    task, e = stable.task_id, "invalid_request"
    tenant = task.split(":", 1)[0]

    def gen(name: str, status: int, code: str, **changes: Any) -> BadCase:
        body = {"task_id": task, "prompt": "hello", **changes}
        return BadCase(name, "POST", "/generate", status, code, json=body)

    def v1(name: str, status: int, code: str, **body: Any) -> BadCase:
        return BadCase(name, "POST", "/v1/completions", status, code, json={"prompt": "x", **body})

    def up(name: str, status: int, code: str, auth: str = "admin", **files: Any) -> BadCase:
        return BadCase(name, "PUT", f"/admin/prefixes/{task}", status, code, files=files, auth=auth)

    num_layers, heads, head_dim = layout
    nan = safetensors.torch.save({"prefix": torch.full((num_layers, 2, heads, 3, head_dim), float("nan"))})
    wrong = safetensors.torch.save({"prefix": torch.zeros(num_layers + 1, 2, heads, 3, head_dim)})
    return [
        BadCase("malformed_json", "POST", "/generate", 422, e, content=b'{"task_id": "x", "prompt": '),
        gen("unknown_task", 404, "unknown_task", task_id=tenant + ":nothing"),  # inside its key's scope
        gen("bad_task_id", 422, e, task_id="no spaces allowed"),
        gen("negative_temperature", 422, e, temperature=-1),
        gen("top_p_zero", 422, e, top_p=0),
        gen("max_new_zero", 422, e, max_new_tokens=0),
        gen("max_new_over_limit", 422, e, max_new_tokens=MAX_NEW_LIMIT + 1),
        gen("five_stops", 422, e, stop=list("abcde")),
        gen("unknown_field", 422, e, bogus=1),
        gen("prompt_and_ids", 422, e, input_ids=[5]),
        gen("empty_prompt", 422, e, prompt=""),
        gen("token_out_of_vocab", 422, e, prompt=None, input_ids=[10**6]),
        gen("oversize_prompt", 422, "context_too_long", prompt="x" * MAX_POSITIONS),
        v1("v1_unknown_model", 404, "model_not_found", model=tenant + ":nothing"),
        v1("v1_echo", 400, e, model=task, echo=True),
        up("admin_no_token", 401, "unauthorized", auth="none", text=(None, b"x")),
        up("admin_wrong_token", 403, "forbidden", auth="wrong", text=(None, b"x")),
        up("upload_pickle", 422, "invalid_prefix", weights=("w", b"\x80\x04\x95\x00")),  # never unpickled
        up("upload_wrong_shape", 422, "model_mismatch", weights=("w", wrong)),
        up("upload_nan", 422, "invalid_prefix", weights=("w", nan)),
        up("upload_too_large", 413, "too_large", weights=("w", bytes(MAX_UPLOAD_BYTES + 16))),
        up("upload_unknown_part", 422, e, bogus=(None, b"x")),
    ]


def bad_headers(ctx: Ctx, case: BadCase) -> dict[str, str]:
    headers = {
        "generation": ctx.headers_for(ctx.tasks[0].task_id),  # bad_cases() is built on tasks[0]
        "admin": ctx.admin,
        "none": {},
        "wrong": {"Authorization": "Bearer nope"},
    }
    out = dict(headers[case.auth])
    if case.content is not None:
        out["content-type"] = "application/json"
    return out


async def op_bad_request(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    case = rng.choice(ctx.bad_cases)
    try:
        response = await ctx.http.request(
            case.method,
            case.path,
            json=case.json,
            content=case.content,
            files=case.files,
            headers=bad_headers(ctx, case),
        )
    except httpx.TransportError as exc:
        raise Lost(f"{case.name}: {type(exc).__name__}: {exc!r}") from exc
    ctx.bad_counts[case.name] += 1
    body = json_of(response)
    error = body.get("error") if isinstance(body, dict) else None
    code, message = (error.get("code"), error.get("message")) if isinstance(error, dict) else (None, None)
    if response.status_code != case.status or code != case.code or not message:
        raise Mismatch(
            f"{case.name}: {response.status_code} {response.text[:300]}, wanted {case.status} {case.code!r}",
            response.status_code,
        )
    return OK, response.status_code


OPS: dict[str, Op] = {
    "generate": op_generate,
    "generate_stream": op_generate_stream,
    "generate_sampled": op_generate_sampled,
    "completions": op_completions,
    "completions_stream": op_completions_stream,
    "cancel_stream": op_cancel_stream,
    "cancel_timeout": op_cancel_timeout,
    "bad_request": op_bad_request,
    "admin_upload": op_admin_upload,
    "admin_read": op_admin_read,
}


async def create_keys(ctx: Ctx) -> None:
    """One unlimited key per tenant, scoped `tenant:*`; and the bad requests only keys make possible."""
    for tenant in TENANTS:
        body = {"name": f"soak-{tenant}", "scopes": [f"{tenant}:*"]}
        response = await ctx.http.post("/admin/keys", json=body, headers=ctx.admin)
        expect_status(response, 201)
        ctx.keys[tenant] = get(json_of(response), "key", str)
    own = ctx.tasks[0].task_id
    foreign = next(t.task_id for t in ctx.tasks if t.task_id.split(":")[0] != own.split(":")[0])
    body = {"task_id": own, "prompt": "hello"}
    ctx.bad_cases += [
        BadCase("gen_without_key", "POST", "/generate", 401, "unauthorized", json=body, auth="none"),
        BadCase("gen_wrong_key", "POST", "/generate", 401, "unauthorized", json=body, auth="wrong"),
        BadCase("gen_foreign_task", "POST", "/generate", 403, "forbidden", json={**body, "task_id": foreign}),
        BadCase(
            "v1_foreign_model",
            "POST",
            "/v1/completions",
            403,
            "forbidden",
            json={"model": foreign, "prompt": "x"},
        ),
    ]
