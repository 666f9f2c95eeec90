"""The official `openai` client against a running server: `model` = task_id."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server_process import ServerProcess


@pytest.fixture
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _generate(client: httpx.Client, server: ServerProcess, prompt: str, max_new_tokens: int) -> dict:
    body = {"task_id": "t:good", "prompt": prompt, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    return dict(client.post(server.url + "/generate", json=body).json())


def test_completion_equals_generate(oai: openai.OpenAI, server: ServerProcess, client: httpx.Client) -> None:
    completion = oai.completions.create(
        model="t:good", prompt="Hello", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    reference = _generate(client, server, "Hello", 12)
    assert completion.object == "text_completion" and completion.model == "t:good"
    assert completion.choices[0].text == reference["text"] and completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 12)


def test_streaming_yields_tokens_as_made(
    oai: openai.OpenAI, server: ServerProcess, client: httpx.Client
) -> None:
    chunks = list(
        oai.completions.create(
            model="t:good",
            prompt="Hello",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 12  # one per token
    assert "".join(c.choices[0].text for c in token_chunks) == _generate(client, server, "Hello", 12)["text"]
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_async_client_stream_and_not(server: ServerProcess) -> None:
    async def main() -> tuple[str, str]:
        aoai = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        args = {"model": "t:good", "prompt": "Hi there", "max_tokens": 8, "temperature": 0}
        whole = await aoai.completions.create(**args)
        stream = await aoai.completions.create(**args, stream=True)
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        await aoai.close()
        return whole.choices[0].text, streamed

    whole, streamed = asyncio.run(main())
    assert whole == streamed


def test_n_seed_and_prompt_lists(oai: openai.OpenAI) -> None:
    args = {
        "model": "t:good",
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 7,
        "extra_body": {"ignore_eos": True},
    }
    first = oai.completions.create(prompt="Tell", n=3, **args)
    again = oai.completions.create(prompt="Tell", n=3, **args)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices}) > 1  # the choices differ from each other
    many = oai.completions.create(prompt=["a", "bb", "ccc"], **args)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage is not None and many.usage.prompt_tokens == 6
    ids = oai.completions.create(prompt=[5, 6, 7], max_tokens=3, model="t:good", temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 3


def test_logprobs_of_chosen_tokens(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(
        model="t:good",
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert logprobs.top_logprobs is not None
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen is not None and chosen <= 0 and top is not None and len(top) <= 2
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_stop_string(oai: openai.OpenAI, server: ServerProcess, client: httpx.Client) -> None:
    text = _generate(client, server, "Hello", 30)["text"]
    if len(text) < 6:
        pytest.skip("the tiny model's greedy text is too short to cut")
    stop = text[3:5]
    cut = oai.completions.create(model="t:good", prompt="Hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_errors_have_openai_shape(oai: openai.OpenAI, server: ServerProcess, client: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="t:nobody", prompt="x", max_tokens=2)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model="t:good", prompt="x", max_tokens=0)
    assert bad.value.code == "invalid_request" and bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="echo"):
        oai.completions.create(model="t:good", prompt="x", max_tokens=2, echo=True)
    with pytest.raises(openai.BadRequestError) as overflow:
        oai.completions.create(model="t:good", prompt="x" * 200, max_tokens=100)
    assert overflow.value.code == "context_too_long"
    raw = client.post(
        server.url + "/v1/completions", json={"model": "t:good", "prompt": "x", "temperature": -1}
    )
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["type"] == "invalid_request_error"


def test_models(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "t:good" in ids
    model = oai.models.retrieve("t:good")
    assert model.id == "t:good" and model.owned_by == "t"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("t:nobody")


def test_chat_on_a_model_without_a_template_is_refused(oai: openai.OpenAI) -> None:
    """The tiny GPT-2 has no chat template and this server no --chat-template (tests/api/test_chat.py)."""
    messages: list = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError, match="--chat-template") as refused:
        oai.chat.completions.create(model="t:good", messages=messages, max_tokens=2)
    assert refused.value.code == "chat_template_missing" and refused.value.status_code == 400
    with pytest.raises(openai.NotFoundError):  # an unknown model is still named as such
        oai.chat.completions.create(model="t:nobody", messages=messages, max_tokens=2)
