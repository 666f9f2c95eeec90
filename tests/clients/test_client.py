"""`PrefixClient` and `AsyncPrefixClient` against a real server over the tiny GPT-2."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clients import AsyncPrefixClient, PrefixClient, PrefixServerError
from clients.models import Usage, error_from_response, parse_info
from tests.clients import canonical_prefix, running_server
from tests.server_process import ServerProcess
from tests.tiny_models import Adapter


@pytest.fixture(scope="module")
def server(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(gpt2_dir, tmp_path_factory.mktemp("client-server") / "data") as proc:
        yield proc


@pytest.fixture
def prefix_client(server: ServerProcess) -> Iterator[PrefixClient]:
    with PrefixClient(server.url, server.admin_token, timeout=60) as c:
        yield c


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, sent: int, total: int) -> None:
        self.calls.append((sent, total))

    def assert_complete(self, total: int) -> None:
        assert self.calls and self.calls[-1] == (total, total)
        sent = [s for s, _ in self.calls]
        assert sent == sorted(sent) and all(t == total for _, t in self.calls)


def test_upload_bytes_path_and_peft_dir_report_progress(
    prefix_client: PrefixClient, adapter: Adapter, tmp_path: Path
) -> None:
    data = canonical_prefix(200)  # 100 KiB: httpx reads it in more than one chunk
    progress = Recorder()
    info = prefix_client.upload("c:bytes", data, progress=progress)
    progress.assert_complete(len(data))
    assert len(progress.calls) > 1
    assert (info.task_id, info.prefix_len, info.dtype, info.num_bytes) == ("c:bytes", 200, "float32", 102400)

    path = tmp_path / "p.safetensors"
    path.write_bytes(canonical_prefix(3))
    progress = Recorder()
    again = prefix_client.upload("c:bytes", path, progress=progress)
    progress.assert_complete(path.stat().st_size)
    assert again.version == info.version + 1 and again.prefix_len == 3

    progress = Recorder()
    peft = prefix_client.upload_peft_dir("c:peft", adapter.path, progress=progress)
    progress.assert_complete(len(adapter.weights))
    assert peft.prefix_len == adapter.num_virtual_tokens
    as_bytes = prefix_client.upload("c:peft", adapter.weights, adapter.config)
    assert as_bytes.version == peft.version + 1 and as_bytes.prefix_len == peft.prefix_len


def test_upload_peft_dir_names_the_missing_file(prefix_client: PrefixClient, tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        prefix_client.upload_peft_dir("c:nope", tmp_path)


def test_upload_text(prefix_client: PrefixClient) -> None:
    info = prefix_client.upload_text("c:text", "You are a terse assistant. ✓")
    assert info.task_id == "c:text" and info.prefix_len > 0 and info.source in (None, "text")
    assert prefix_client.generate("c:text", "Hi", max_new_tokens=4).prefix_tokens == info.prefix_len


def test_list_and_iter_follow_cursors(prefix_client: PrefixClient) -> None:
    task_ids = [f"page:{i}" for i in range(5)]
    for i, task_id in enumerate(task_ids):
        prefix_client.upload(task_id, canonical_prefix(2, seed=i))
    first = prefix_client.list(limit=2)
    assert len(first.items) == 2 and first.next_cursor is not None
    walked, cursor = [], None
    while True:
        page = prefix_client.list(limit=2, cursor=cursor)
        walked += [i.task_id for i in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    iterated = [i.task_id for i in prefix_client.iter_prefixes(page_size=2)]
    assert iterated == walked and len(set(iterated)) == len(iterated)
    assert set(task_ids) <= set(iterated)
    assert [i.task_id for i in prefix_client.iter_prefixes(page_size=1000)] == iterated


def test_get_warm_delete(prefix_client: PrefixClient) -> None:
    uploaded = prefix_client.upload("c:get", canonical_prefix(4))
    assert prefix_client.get("c:get") == uploaded
    warmed = prefix_client.warm("c:get")
    assert warmed.version == uploaded.version and warmed.tiers
    prefix_client.delete("c:get")
    with pytest.raises(PrefixServerError) as missing:
        prefix_client.get("c:get")
    assert (missing.value.status, missing.value.code) == (404, "unknown_task")
    with pytest.raises(PrefixServerError, match="unknown_task"):
        prefix_client.delete("c:get")


def test_generate_equals_raw_http(prefix_client: PrefixClient, server: ServerProcess) -> None:
    prefix_client.upload("c:gen", canonical_prefix(5))
    cases = [
        {"prompt": "Hello", "max_new_tokens": 8},
        {"input_ids": [5, 6, 7], "max_new_tokens": 6, "ignore_eos": True},
        {"prompt": "Hi", "max_new_tokens": 10, "temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 7},
        {"prompt": "Hi", "max_new_tokens": 10, "stop": ["a", "e"], "add_special_tokens": True},
    ]
    for case in cases:
        ours = prefix_client.generate("c:gen", **case)  # type: ignore[arg-type]
        raw = httpx.post(server.url + "/generate", json={"task_id": "c:gen", **case}, timeout=60).json()
        assert ours.id != raw["id"]
        assert (ours.task_id, ours.prefix_version, ours.text, list(ours.token_ids), ours.finish_reason) == (
            raw["task_id"],
            raw["prefix_version"],
            raw["text"],
            raw["token_ids"],
            raw["finish_reason"],
        )
        assert (ours.prompt_tokens, ours.completion_tokens, ours.prefix_tokens) == tuple(
            raw["usage"][k] for k in ("prompt_tokens", "completion_tokens", "prefix_tokens")
        )


def test_stream_concatenates_to_generate(prefix_client: PrefixClient) -> None:
    info = prefix_client.upload("c:stream", canonical_prefix(6))
    whole = prefix_client.generate("c:stream", "Once upon", max_new_tokens=12, ignore_eos=True)
    events = list(prefix_client.stream("c:stream", "Once upon", max_new_tokens=12, ignore_eos=True))
    assert len(events) == 12
    assert "".join(e.text for e in events) == whole.text
    assert [t for e in events for t in e.token_ids] == list(whole.token_ids)
    assert all(e.finish_reason is None and e.usage is None for e in events[:-1])
    last = events[-1]
    assert (last.finish_reason, last.prefix_version) == ("length", info.version)
    assert last.usage == Usage(prompt_tokens=9, completion_tokens=12, prefix_tokens=6)


def test_errors_carry_status_and_code(prefix_client: PrefixClient, server: ServerProcess) -> None:
    def error_of(call: object) -> PrefixServerError:
        with pytest.raises(PrefixServerError) as caught:
            call()  # type: ignore[operator]
        return caught.value

    unknown = error_of(lambda: prefix_client.generate("c:absent", "Hi"))
    assert (unknown.status, unknown.code, unknown.retry_after) == (404, "unknown_task", None)
    assert "c:absent" in unknown.message
    assert error_of(lambda: list(prefix_client.stream("c:absent", "Hi"))).code == "unknown_task"
    invalid = error_of(lambda: prefix_client.generate("c:absent", "Hi", temperature=-1))
    assert (invalid.status, invalid.code) == (422, "invalid_request") and "temperature" in invalid.message
    assert error_of(lambda: prefix_client.get("bad id")).code == "invalid_request"
    bad_prefix = error_of(lambda: prefix_client.upload("c:bad", b"not safetensors"))
    assert (bad_prefix.status, bad_prefix.code) == (422, "invalid_prefix")
    with PrefixClient(server.url) as anonymous:
        assert (error_of(lambda: anonymous.list()).status, error_of(lambda: anonymous.list()).code) == (
            401,
            "unauthorized",
        )
        assert anonymous.health() == {"status": "ok"} and anonymous.ready() is True
    with PrefixClient(server.url, "wrong") as wrong:
        assert error_of(lambda: wrong.get("c:gen")).code == "forbidden"


def test_error_from_non_json_and_retry_after() -> None:
    request = httpx.Request("GET", "http://x/")
    proxy = error_from_response(httpx.Response(502, text="upstream down", request=request))
    assert (proxy.status, proxy.code) == (502, "http_error")
    assert "Bad Gateway" in proxy.message and "upstream down" in proxy.message
    body = {"error": {"code": "overloaded", "message": "busy"}}
    busy = error_from_response(httpx.Response(429, json=body, headers={"Retry-After": "2"}, request=request))
    assert (busy.code, busy.message, busy.retry_after) == ("overloaded", "busy", 2.0)


def test_parse_info_reads_source_when_present() -> None:
    data = {
        "task_id": "a",
        "version": 1,
        "prefix_len": 2,
        "num_bytes": 3,
        "dtype": "float32",
        "model_fingerprint": "f",
        "created_at": "now",
    }
    assert parse_info(data).source is None
    assert parse_info({**data, "source": "text", "unknown": 1}).source == "text"


def test_async_client_basics(server: ServerProcess, adapter: Adapter) -> None:
    async def scenario() -> None:
        async with AsyncPrefixClient(server.url, server.admin_token, timeout=60) as client:
            assert await client.health() == {"status": "ok"} and await client.ready()
            progress = Recorder()
            data = canonical_prefix(200, seed=1)
            info = await client.upload("a:bytes", data, progress=progress)
            progress.assert_complete(len(data))
            assert info.prefix_len == 200
            peft = await client.upload_peft_dir("a:peft", adapter.path)
            assert peft.prefix_len == adapter.num_virtual_tokens
            assert await client.get("a:peft") == peft
            assert (await client.warm("a:peft")).tiers
            first = await client.list(limit=1)
            assert len(first.items) == 1 and first.next_cursor is not None
            iterated = [i.task_id async for i in client.iter_prefixes(page_size=1)]
            assert {"a:bytes", "a:peft"} <= set(iterated) and len(set(iterated)) == len(iterated)
            whole = await client.generate("a:peft", input_ids=[5, 6], max_new_tokens=8, ignore_eos=True)
            with PrefixClient(server.url) as sync_client:
                assert (
                    whole.token_ids
                    == sync_client.generate(
                        "a:peft", input_ids=[5, 6], max_new_tokens=8, ignore_eos=True
                    ).token_ids
                )
            events = [
                e async for e in client.stream("a:peft", input_ids=[5, 6], max_new_tokens=8, ignore_eos=True)
            ]
            assert "".join(e.text for e in events) == whole.text
            assert tuple(t for e in events for t in e.token_ids) == whole.token_ids
            assert events[-1].finish_reason == "length"
            await client.delete("a:bytes")
            with pytest.raises(PrefixServerError) as missing:
                await client.get("a:bytes")
            assert (missing.value.status, missing.value.code) == (404, "unknown_task")
            with pytest.raises(PrefixServerError, match="unknown_task"):
                async for _ in client.stream("a:bytes", "Hi"):
                    pass
        async with AsyncPrefixClient(server.url) as anonymous:
            with pytest.raises(PrefixServerError) as unauthorized:
                await anonymous.list()
            assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")

    asyncio.run(scenario())


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
RENDERED = "<system>Be brief.\n<user>Hi there\n<assistant>"
PENALTIES = {"frequency_penalty": 0.5, "presence_penalty": 0.4, "repetition_penalty": 1.3}


def _raw(server: ServerProcess, path: str, body: dict[str, object]) -> dict[str, object]:
    answer = httpx.post(server.url + path, json=body, timeout=60, headers=server.admin_headers)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_chat_sync_async_and_streamed_equal_the_server_and_generate(
    prefix_client: PrefixClient, server: ServerProcess
) -> None:
    """chat() renders through the server's template: its answer is /generate's on the rendered
    prompt; the async client and both streams say the same, penalties included."""
    prefix_client.upload("c:chat", canonical_prefix(4, seed=7))
    sampling = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, **PENALTIES}  # chat: 1 by default
    answer = prefix_client.chat("c:chat", MESSAGES, **sampling)  # type: ignore[arg-type]
    body = {"task_id": "c:chat", "prompt": RENDERED, "max_new_tokens": 12, "ignore_eos": True, **PENALTIES}
    reference = _raw(server, "/generate", body)
    assert answer.content == reference["text"] and answer.model == "c:chat"
    assert (answer.finish_reason, answer.completion_tokens) == ("length", 12)
    assert answer.prompt_tokens == len(RENDERED) and answer.id.startswith("chatcmpl-")
    plain = prefix_client.chat("c:chat", MESSAGES, max_tokens=12, temperature=0, ignore_eos=True)
    assert plain.content != answer.content  # the penalties reached the engine

    chunks = list(prefix_client.chat_stream("c:chat", MESSAGES, **sampling))  # type: ignore[arg-type]
    assert "".join(c.content for c in chunks) == answer.content
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    async def run_async() -> tuple[str, str]:
        async with AsyncPrefixClient(server.url, server.admin_token, timeout=60) as client:
            whole = await client.chat("c:chat", MESSAGES, **sampling)  # type: ignore[arg-type]
            pieces = [c.content async for c in client.chat_stream("c:chat", MESSAGES, **sampling)]  # type: ignore[arg-type]
        return whole.content, "".join(pieces)

    assert asyncio.run(run_async()) == (answer.content, answer.content)


def test_generate_sends_penalties(prefix_client: PrefixClient, server: ServerProcess) -> None:
    prefix_client.upload("c:pen", canonical_prefix(4, seed=8))
    body = {"task_id": "c:pen", "prompt": "Hello", "max_new_tokens": 16, "ignore_eos": True}
    penalised = prefix_client.generate("c:pen", "Hello", max_new_tokens=16, ignore_eos=True, **PENALTIES)  # type: ignore[arg-type]
    assert list(penalised.token_ids) == _raw(server, "/generate", body | PENALTIES)["token_ids"]
    assert list(penalised.token_ids) != _raw(server, "/generate", body)["token_ids"]


def test_chat_errors_raise_with_the_openai_code(prefix_client: PrefixClient) -> None:
    with pytest.raises(PrefixServerError) as failed:
        prefix_client.chat("c:nobody-uploaded-this", MESSAGES)
    assert failed.value.status == 404
