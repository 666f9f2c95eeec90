"""The attacks of `bench/abuse.py`: one coroutine each, run in its own process until `stop`.

Issue 12's five (`invalid_bodies`, `prompt_lists`, `hogging`, `slow_headers`,
`unread_streams`), then issue 25's table, #1 to #11, by name:

| # | name | what |
| --- | --- | --- |
| 1 | `slowloris_body` | no credentials: 1,030 connections, `Content-Length: 1000000`, one byte every 5 s |
| 2 | `float_bodies_anon` | no credentials: 4 loops of a 1 MB body, one array of 120k `1.5e300` |
| 3 | `chat_1mb_limited` | chat with 1 MB of content, 4 at a time, on a key limited to 0.1 request/s |
| 4 | `completions_1mb_prompt` | `/v1/completions` with a 1 MB text prompt, 4 at a time |
| 5 | `chat_many_messages` | chat with 1,024 messages of 4 characters, 4 at a time |
| 6 | `long_input_ids` | `/generate` with 1,000 `input_ids` and `max_new_tokens: 1`, 8 at a time |
| 7 | `queue_fill_n16` | the waiting queue filled by long generations, then `n=16` requests in a loop |
| 8 | `models_listing` | `GET /v1/models?limit=10000`, 8 at a time |
| 9 | `unread_streams_n16` | 3 streams never read, `n=16`, `logprobs=5` |
| 10 | `anonymous_probes` | anonymous `/metrics`, `/docs`, `/openapi.json` in loops |
| 11 | `hostile_uploads` | admin: 3e38 values, `prefix_len` = max_len - 1, bad UTF-8, 1M characters |
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import safetensors.torch
import torch

VICTIM, ATTACKER = "victim:task", "attacker:task"
LAYERS, HEADS, HEAD_DIM = 2, 4, 8  # the tiny GPT-2 of tests/tiny_models.py


@dataclass(frozen=True)
class Target:
    """Where and as whom an attack runs (picklable: each attack runs in its own process)."""

    url: str
    attacker: dict[str, str]  # the attacker's key (no limits)
    limited: dict[str, str]  # the attacker's key limited to 0.1 request/s
    admin: dict[str, str]
    max_len: int

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


Attack = Callable[[Target, asyncio.Event], Awaitable[None]]
JSON = {"content-type": "application/json"}


async def _loop(
    stop: asyncio.Event, num: int, send: Callable[[httpx.AsyncClient], Awaitable[object]]
) -> None:
    """`num` clients, each sending `send` back to back until `stop`."""

    async def one() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            while not stop.is_set():
                try:
                    await send(client)
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(num)))


async def _loop_posts(
    target: Target, stop: asyncio.Event, path: str, content: bytes, num: int, headers: dict[str, str]
) -> None:
    url = target.url + path
    await _loop(stop, num, lambda c: c.post(url, content=content, headers={**headers, **JSON}))


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


# ---- issue 12 ------------------------------------------------------------------------------
async def invalid_bodies(target: Target, stop: asyncio.Event) -> None:
    v1 = b'{"model": "%s", "prompt": [' % ATTACKER.encode() + b",".join([b"{}"] * 340_000) + b"]}"
    gen = b'{"task_id": "%s", "input_ids": [' % ATTACKER.encode() + b",".join([b"[]"] * 340_000) + b"]}"
    await asyncio.gather(
        _loop_posts(target, stop, "/v1/completions", v1, 2, target.attacker),
        _loop_posts(target, stop, "/generate", gen, 2, target.attacker),
    )


async def prompt_lists(target: Target, stop: asyncio.Event) -> None:
    body = _json({"model": ATTACKER, "prompt": ["ab"] * 200_000, "max_tokens": 1})
    await _loop_posts(target, stop, "/v1/completions", body, 4, target.attacker)


async def hogging(target: Target, stop: asyncio.Event) -> None:
    body = {
        "model": ATTACKER,
        "prompt": [5, 6],
        "n": 16,
        "max_tokens": 1000,
        "ignore_eos": True,
        "temperature": 1,
    }
    await _loop_posts(target, stop, "/v1/completions", _json(body), 2, target.attacker)


async def _hold_connections(
    target: Target, num: int, first_bytes: bytes, stop: asyncio.Event, rcvbuf: int = 0, drip_s: float = 0.0
) -> None:
    """`num` connections that send `first_bytes` and never read an answer (re-opened when cut);
    with `drip_s`, one more byte every `drip_s` seconds."""

    async def one() -> None:
        while not stop.is_set():
            sock = socket.socket()
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", target.port))
                reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
                writer.write(first_bytes)
                await _hold(reader, writer, sock, stop, rcvbuf == 0, drip_s)
                writer.close()
            except OSError:
                await asyncio.sleep(0.2)
            finally:
                sock.close()

    await asyncio.gather(*(one() for _ in range(num)))


async def _hold(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    sock: socket.socket,
    stop: asyncio.Event,
    can_peek: bool,
    drip_s: float,
) -> None:
    waited = 0.0
    while not stop.is_set():  # notice when the server cuts us
        await asyncio.sleep(0.5)
        waited += 0.5
        if writer.is_closing() or reader.at_eof() or sock.fileno() < 0:
            return
        if can_peek and await _peer_closed(reader):
            return
        if drip_s and waited >= drip_s:
            waited = 0.0
            writer.write(b"0")
            await writer.drain()


async def _peer_closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1024), 0.01) == b""
    except TimeoutError:
        return False


async def slow_headers(target: Target, stop: asyncio.Event) -> None:
    await _hold_connections(target, 1000, b"POST /generate HTTP/1.1\r\nHost: x\r\n", stop)


def _stream_request(body: dict[str, object], headers: dict[str, str]) -> bytes:
    content = _json(body)
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(content)}\r\nAuthorization: {headers['Authorization']}\r\n\r\n"
    return head.encode() + content


async def unread_streams(target: Target, stop: asyncio.Event) -> None:
    body = {
        "model": ATTACKER,
        "prompt": [5, 6],
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
        "logprobs": 5,
    }
    await _hold_connections(target, 50, _stream_request(body, target.attacker), stop, rcvbuf=1024)


# ---- issue 25 ------------------------------------------------------------------------------
async def slowloris_body(target: Target, stop: asyncio.Event) -> None:
    """#1: no credentials, a body announced as 1 MB and sent one byte every 5 s."""
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: 1000000\r\n\r\n"
    await _hold_connections(target, 1030, head + b"{", stop, drip_s=5.0)


async def float_bodies_anon(target: Target, stop: asyncio.Event) -> None:
    """#2: no credentials; every answer is 401, after the body was (once) parsed."""
    body = b'{"task_id": "%s", "input_ids": [' % ATTACKER.encode() + b",".join([b"1.5e300"] * 120_000) + b"]}"
    await _loop_posts(target, stop, "/generate", body, 4, {})


async def chat_1mb_limited(target: Target, stop: asyncio.Event) -> None:
    """#3: a key limited to 0.1 request/s: nearly all 429, which must cost no rendering."""
    body = {"model": ATTACKER, "messages": [{"role": "user", "content": "ab " * 350_000}], "max_tokens": 1}
    await _loop_posts(target, stop, "/v1/chat/completions", _json(body), 4, target.limited)


async def completions_1mb_prompt(target: Target, stop: asyncio.Event) -> None:
    """#4: a prompt that cannot fit, known by its length before tokenizing."""
    body = {"model": ATTACKER, "prompt": "ab " * 350_000, "max_tokens": 1}
    await _loop_posts(target, stop, "/v1/completions", _json(body), 4, target.attacker)


async def chat_many_messages(target: Target, stop: asyncio.Event) -> None:
    """#5: 1,024 messages of 4 characters (4,096: the old off-loop threshold exactly)."""
    messages = [{"role": "user", "content": "abcd"}] * 1024
    body = {"model": ATTACKER, "messages": messages, "max_tokens": 1}
    await _loop_posts(target, stop, "/v1/chat/completions", _json(body), 4, target.attacker)


async def long_input_ids(target: Target, stop: asyncio.Event) -> None:
    """#6: prefill-heavy requests that generate one token each."""
    body = {"task_id": ATTACKER, "input_ids": [5 + i % 200 for i in range(1000)], "max_new_tokens": 1}
    await _loop_posts(target, stop, "/generate", _json(body), 8, target.attacker)


async def queue_fill_n16(target: Target, stop: asyncio.Event) -> None:
    """#7: long generations fill the slots and the queue; `n=16` requests then meet a full queue
    (429), which must leave no row behind."""
    filler = {"task_id": ATTACKER, "input_ids": [5, 6], "max_new_tokens": 1000, "ignore_eos": True}
    wide = {
        "model": ATTACKER,
        "prompt": [5, 6],
        "n": 16,
        "max_tokens": 50,
        "ignore_eos": True,
        "temperature": 1,
    }
    await asyncio.gather(
        _loop_posts(target, stop, "/generate", _json(filler), 260, target.attacker),
        _loop_posts(target, stop, "/v1/completions", _json(wide), 4, target.attacker),
    )


async def models_listing(target: Target, stop: asyncio.Event) -> None:
    """#8: the largest page of models, 8 at a time."""
    url = target.url + "/v1/models?limit=10000"
    await _loop(stop, 8, lambda c: c.get(url, headers=target.attacker))


async def unread_streams_n16(target: Target, stop: asyncio.Event) -> None:
    """#9: every row of these streams ends up paused; the engine must not spin meanwhile."""
    body = {
        "model": ATTACKER, "prompt": [5, 6], "n": 16, "max_tokens": 1000, "ignore_eos": True,
        "temperature": 1, "stream": True, "logprobs": 5,
    }  # fmt: skip
    await _hold_connections(target, 3, _stream_request(body, target.attacker), stop, rcvbuf=1024)


async def anonymous_probes(target: Target, stop: asyncio.Event) -> None:
    """#10: what anyone can read without a key."""
    paths = ["/metrics", "/docs", "/openapi.json"]
    await asyncio.gather(*(_loop(stop, 1, lambda c, p=p: c.get(target.url + p)) for p in paths))  # type: ignore[misc]


def _hostile_uploads(target: Target) -> list[dict[str, tuple[str | None, bytes]]]:
    huge = torch.full((LAYERS, 2, HEADS, 3, HEAD_DIM), 3e38)
    no_room = torch.randn(LAYERS, 2, HEADS, target.max_len - 1, HEAD_DIM)
    return [
        {"weights": ("w", safetensors.torch.save({"prefix": huge}))},
        {"weights": ("w", safetensors.torch.save({"prefix": no_room}))},
        {"text": (None, b"text \xff\xfe not UTF-8")},
        {"text": (None, b"ab " * 333_333)},
    ]


async def hostile_uploads(target: Target, stop: asyncio.Event) -> None:
    """#11: uploads that used to be accepted (then failed every request) or stall the loop."""
    forms = _hostile_uploads(target)

    async def upload(client: httpx.AsyncClient, index: list[int]) -> None:
        index[0] += 1
        files = forms[index[0] % len(forms)]
        await client.put(
            target.url + f"/admin/prefixes/attacker:upload-{index[0] % 4}", files=files, headers=target.admin
        )

    counter = [0]
    await _loop(stop, 2, lambda c: upload(c, counter))


ATTACKS: dict[str, Attack] = {
    "invalid_bodies": invalid_bodies,
    "prompt_lists": prompt_lists,
    "hogging": hogging,
    "slow_headers": slow_headers,
    "unread_streams": unread_streams,
    "slowloris_body": slowloris_body,
    "float_bodies_anon": float_bodies_anon,
    "chat_1mb_limited": chat_1mb_limited,
    "completions_1mb_prompt": completions_1mb_prompt,
    "chat_many_messages": chat_many_messages,
    "long_input_ids": long_input_ids,
    "queue_fill_n16": queue_fill_n16,
    "models_listing": models_listing,
    "unread_streams_n16": unread_streams_n16,
    "anonymous_probes": anonymous_probes,
    "hostile_uploads": hostile_uploads,
}
