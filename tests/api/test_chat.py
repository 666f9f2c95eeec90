"""`/v1/chat/completions` with the official `openai` client (sync, async, streaming) against a
running server over the tiny GPT-2 given a `--chat-template`: answers equal `/generate` on the
rendered prompt token for token; sampling penalties reach the engine from every route; errors
have OpenAI's classes and codes (tools, images, unknown model; a model without a template: in
test_openai.py, whose server has none)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from server.engine.demo_model import DEMO_WEIGHTS, ensure_demo_model
from tests.api.conftest import serving_good_task
from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess
from tests.tiny_models import Adapter

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
]
RENDERED = "<system>Be brief.\n<user>Hi there\n<assistant>"


@pytest.fixture(scope="module")
def chat_server(
    gpt2_dir: Path, adapter: Adapter, redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Task `t:good` on the tiny GPT-2 (no chat template of its own) given `--chat-template`."""
    root = tmp_path_factory.mktemp("chat")
    (root / "template.jinja").write_text(TEMPLATE)
    flags = ("--chat-template", str(root / "template.jinja"))
    with serving_good_task(gpt2_dir, adapter, redis_proc, root / "data", *flags) as proc:
        yield proc


@pytest.fixture
def oai(chat_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)


def _generate(server: ServerProcess, prompt: str, max_new_tokens: int, **extra: Any) -> dict[str, Any]:
    body = {"task_id": "t:good", "prompt": prompt, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        response = client.post(server.url + "/generate", json=body | extra)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_chat_equals_generate_on_the_rendered_prompt(oai: openai.OpenAI, chat_server: ServerProcess) -> None:
    chat = oai.chat.completions.create(
        model="t:good", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2,
        user="someone", extra_body={"ignore_eos": True},
    )  # fmt: skip
    reference = _generate(chat_server, RENDERED, 12)
    [choice] = chat.choices
    assert chat.object == "chat.completion" and chat.model == "t:good" and chat.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == reference["text"]
    assert choice.finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    assert chat.usage.prompt_tokens == reference["usage"]["prompt_tokens"] == len(RENDERED)  # bytes
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == 12
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_streaming_sync_with_usage_and_n(oai: openai.OpenAI, chat_server: ServerProcess) -> None:
    args: dict[str, Any] = {"model": "t:good", "messages": MESSAGES, "temperature": 0}
    whole = oai.chat.completions.create(**args, max_completion_tokens=10)
    chunks = list(
        oai.chat.completions.create(
            **args, max_completion_tokens=10, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * len(chunks)
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [
        (0, "assistant"),
        (1, "assistant"),
    ]
    for index in (0, 1):  # greedy: both choices write the same text, interleaved in the stream
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[0].message.content
        assert mine[-1].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2 * (whole.usage.completion_tokens if whole.usage else 0)


def test_async_client_stream_and_not(chat_server: ServerProcess) -> None:
    async def main() -> tuple[str | None, str]:
        aoai = openai.AsyncOpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)
        args: dict[str, Any] = {"model": "t:good", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
        whole = await aoai.chat.completions.create(**args)
        stream = await aoai.chat.completions.create(**args, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await aoai.close()
        return whole.choices[0].message.content, streamed

    whole, streamed = asyncio.run(main())
    assert whole == streamed and whole


def test_n_and_seed_reproduce(oai: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": "t:good", "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 3,
        "stop": ["zzz"], "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    first = oai.chat.completions.create(**args)
    again = oai.chat.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # the choices differ from each other


def test_penalties_reach_the_engine_from_every_route(oai: openai.OpenAI, chat_server: ServerProcess) -> None:
    """The same penalised greedy generation through /generate, /v1/completions and chat."""
    penalties = {"frequency_penalty": 2.0, "presence_penalty": 1.0, "repetition_penalty": 1.5}
    plain = _generate(chat_server, RENDERED, 24)
    penalised = _generate(chat_server, RENDERED, 24, **penalties)
    assert penalised["token_ids"] != plain["token_ids"]
    assert len(set(penalised["token_ids"])) > len(set(plain["token_ids"]))  # fewer repeats
    extra = {"ignore_eos": True, "repetition_penalty": 1.5}
    completion = oai.completions.create(
        model="t:good", prompt=RENDERED, max_tokens=24, temperature=0,
        frequency_penalty=2.0, presence_penalty=1.0, extra_body=extra,
    )  # fmt: skip
    chat = oai.chat.completions.create(
        model="t:good", messages=MESSAGES, max_tokens=24, temperature=0,
        frequency_penalty=2.0, presence_penalty=1.0, extra_body=extra,
    )  # fmt: skip
    assert completion.choices[0].text == chat.choices[0].message.content == penalised["text"]


def test_out_of_range_penalties(oai: openai.OpenAI, chat_server: ServerProcess) -> None:
    with httpx.Client(timeout=30) as client:
        body = {"task_id": "t:good", "prompt": "x", "max_new_tokens": 2}
        for bad in ({"repetition_penalty": 0}, {"frequency_penalty": 2.5}, {"presence_penalty": -3}):
            response = client.post(chat_server.url + "/generate", json=body | bad)
            assert response.status_code == 422 and next(iter(bad)) in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as bad_chat:
        oai.chat.completions.create(model="t:good", messages=MESSAGES, max_tokens=2, presence_penalty=2.5)
    assert bad_chat.value.param == "presence_penalty"


def test_errors_have_openai_classes_and_codes(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="t:nobody", messages=MESSAGES, max_tokens=2)
    assert missing.value.code == "model_not_found"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="function calling") as tools:
        oai.chat.completions.create(model="t:good", messages=MESSAGES, max_tokens=2, tools=[tool])  # type: ignore[list-item]
    assert tools.value.code == "invalid_request" and tools.value.param == "tools"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    content = [{"type": "text", "text": "What is this?"}, image]
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[1\]: .*images") as images:
        oai.chat.completions.create(
            model="t:good", messages=[{"role": "user", "content": content}], max_tokens=2
        )  # type: ignore[misc, list-item]
    assert images.value.param == "messages"
    with pytest.raises(openai.BadRequestError, match="tool"):
        oai.chat.completions.create(
            model="t:good", messages=[{"role": "tool", "content": "1", "tool_call_id": "c"}]
        )
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        oai.chat.completions.create(model="t:good", messages=MESSAGES, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError) as overflow:
        oai.chat.completions.create(model="t:good", messages=[{"role": "user", "content": "x" * 300}])
    assert overflow.value.code == "context_too_long"


def test_default_max_tokens_fill_the_context_left(oai: openai.OpenAI) -> None:
    """No max_tokens: the answer may run to the end of the context (prefix + prompt + output)."""
    long = [{"role": "user", "content": "y" * 220}]
    chat = oai.chat.completions.create(
        model="t:good", messages=long, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.usage is not None and chat.choices[0].finish_reason == "length"
    assert 4 + chat.usage.prompt_tokens + chat.usage.completion_tokens == 256  # prefix 4, 256 positions


def test_the_demo_model_ships_a_template_and_stale_installs_get_it(tmp_path: Path) -> None:
    target = ensure_demo_model(tmp_path / "demo")
    (target / "chat_template.jinja").unlink()  # as installed by a release before the template
    ensure_demo_model(target)
    assert (target / "chat_template.jinja").read_bytes() == (
        DEMO_WEIGHTS / "chat_template.jinja"
    ).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(target)
    messages = [
        {"role": "system", "content": "Hello! Welcome to Zizzi."},
        {"role": "user", "content": "Hi, how are you?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "Hello! Welcome to Zizzi. Hi, how are you? "
