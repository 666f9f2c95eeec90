"""Hostile-tenant benchmark: what one tenant's attack does to another tenant's latency.

Starts its own `prefix-serve` (a tiny GPT-2, embedded Redis under a temporary dir), creates two
tenants with their own scoped API keys, then measures the *victim's* 8-token greedy `/generate`
(one request at a time, back to back) with no attack, and under each attack by the other tenant:

- `invalid_bodies`: 1 MB bodies of `"prompt": [{}, {}, ...]` / `"input_ids": [[], ...]`, 4 at a time
- `prompt_lists`: 200,000 prompts in one `/v1/completions` request, 4 at a time
- `hogging`: `n=16` x `max_tokens=1000` completions, 2 at a time
- `slow_headers`: 1,000 connections that never finish their headers (re-opened when cut)
- `unread_streams`: 50 streamed completions whose answers are never read (re-opened when cut)

The bound (issue 12): under every attack the victim's p99 stays within 3x its no-attack p99 plus
one engine step (the mean step time during that attack, from the server's own histogram).
Writes `bench/results/abuse.json` and the `abuse` section of docs/benchmarks.md (`--no-docs`: not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.doc_sections import write_section  # noqa: E402
from tests.server_process import ServerProcess, upload_adapter  # noqa: E402
from tests.tiny_models import save_adapter, save_tiny_model  # noqa: E402

VICTIM, ATTACKER = "victim:task", "attacker:task"
Attack = Callable[[str, dict[str, str], asyncio.Event], Awaitable[None]]


async def _victim(url: str, headers: dict[str, str], stop: asyncio.Event) -> list[float]:
    body = {"task_id": VICTIM, "input_ids": [5, 6, 7], "max_new_tokens": 8, "ignore_eos": True}
    latencies = []
    async with httpx.AsyncClient(timeout=120) as client:
        while not stop.is_set():
            started = time.perf_counter()
            answer = await client.post(url + "/generate", json=body, headers=headers)
            answer.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


async def _loop_posts(
    url: str, headers: dict[str, str], stop: asyncio.Event, path: str, content: bytes, num: int
) -> None:
    async def one() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            while not stop.is_set():
                try:
                    await client.post(
                        url + path, content=content, headers={**headers, "content-type": "application/json"}
                    )
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(num)))


async def invalid_bodies(url: str, headers: dict[str, str], stop: asyncio.Event) -> None:
    v1 = b'{"model": "%s", "prompt": [' % ATTACKER.encode() + b",".join([b"{}"] * 340_000) + b"]}"
    gen = b'{"task_id": "%s", "input_ids": [' % ATTACKER.encode() + b",".join([b"[]"] * 340_000) + b"]}"
    await asyncio.gather(
        _loop_posts(url, headers, stop, "/v1/completions", v1, 2),
        _loop_posts(url, headers, stop, "/generate", gen, 2),
    )


async def prompt_lists(url: str, headers: dict[str, str], stop: asyncio.Event) -> None:
    body = json.dumps({"model": ATTACKER, "prompt": ["ab"] * 200_000, "max_tokens": 1}).encode()
    await _loop_posts(url, headers, stop, "/v1/completions", body, 4)


async def hogging(url: str, headers: dict[str, str], stop: asyncio.Event) -> None:
    body = {
        "model": ATTACKER,
        "prompt": [5, 6],
        "n": 16,
        "max_tokens": 1000,
        "ignore_eos": True,
        "temperature": 1,
    }
    await _loop_posts(url, headers, stop, "/v1/completions", json.dumps(body).encode(), 2)


async def _hold_connections(
    url: str, num: int, first_bytes: bytes, stop: asyncio.Event, rcvbuf: int = 0
) -> None:
    port = int(url.rsplit(":", 1)[1])

    async def one() -> None:
        while not stop.is_set():
            sock = socket.socket()
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
                writer.write(first_bytes)
                while not stop.is_set():  # never read a response; notice when the server cuts us
                    await asyncio.sleep(0.5)
                    if writer.is_closing() or reader.at_eof() or sock.fileno() < 0:
                        break
                    if rcvbuf == 0 and (await _peer_closed(reader)):
                        break
                writer.close()
            except OSError:
                await asyncio.sleep(0.2)
            finally:
                sock.close()

    await asyncio.gather(*(one() for _ in range(num)))


async def _peer_closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1024), 0.01) == b""
    except TimeoutError:
        return False


async def slow_headers(url: str, headers: dict[str, str], stop: asyncio.Event) -> None:
    await _hold_connections(url, 1000, b"POST /generate HTTP/1.1\r\nHost: x\r\n", stop)


async def unread_streams(url: str, headers: dict[str, str], stop: asyncio.Event) -> None:
    body = json.dumps(
        {
            "model": ATTACKER,
            "prompt": [5, 6],
            "max_tokens": 1000,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 5,
        }
    ).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\nAuthorization: {headers['Authorization']}\r\n\r\n"
    await _hold_connections(url, 50, head.encode() + body, stop, rcvbuf=1024)


ATTACKS: dict[str, Attack] = {
    "invalid_bodies": invalid_bodies,
    "prompt_lists": prompt_lists,
    "hogging": hogging,
    "slow_headers": slow_headers,
    "unread_streams": unread_streams,
}


def _step_totals(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        for name in ("prefix_server_engine_step_seconds_sum", "prefix_server_engine_step_seconds_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("prefix_server_engine_step_seconds_sum", 0.0), values.get(
        "prefix_server_engine_step_seconds_count", 0.0
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _attack_process(name: str, url: str, headers: dict[str, str], seconds: float) -> None:
    """One attack for `seconds`, in its own process: its client work must not slow the victim's
    client (both would otherwise share one event loop and one GIL)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await ATTACKS[name](url, headers, stop)

    asyncio.run(run())


async def _phase(url: str, keys: dict[str, str], attack: str | None, seconds: float) -> dict[str, Any]:
    stop = asyncio.Event()
    victim_headers = {"Authorization": f"Bearer {keys['victim']}"}
    attacker_headers = {"Authorization": f"Bearer {keys['attacker']}"}
    before = _step_totals(url)
    attacker = None
    if attack is not None:
        attacker = multiprocessing.get_context("spawn").Process(
            target=_attack_process, args=(attack, url, attacker_headers, seconds + 1.0)
        )
        attacker.start()
        await asyncio.sleep(1.0)  # let the attack build up first
    victim = asyncio.ensure_future(_victim(url, victim_headers, stop))
    await asyncio.sleep(seconds)
    stop.set()
    latencies = await victim
    if attacker is not None:
        await asyncio.to_thread(attacker.join, 600)
    after = _step_totals(url)
    num_steps = after[1] - before[1]
    return {
        "num_requests": len(latencies),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * _percentile(latencies, 0.99), 2),
        "mean_step_ms": round(1000 * (after[0] - before[0]) / num_steps, 2) if num_steps else 0.0,
    }


def _setup(workdir: Path) -> tuple[ServerProcess, dict[str, str]]:
    model_dir = save_tiny_model("gpt2", workdir / "model", max_positions=2048)
    adapter = save_adapter(model_dir, workdir / "adapter", num_virtual_tokens=8, seed=0)
    server = ServerProcess(workdir / "data", "--model", str(model_dir), "--log-level", "warning").start()
    weights = (adapter.path / "adapter_model.safetensors").read_bytes()
    config = (adapter.path / "adapter_config.json").read_bytes()
    keys = {}
    with httpx.Client(timeout=60) as client:
        for tenant, task in (("victim", VICTIM), ("attacker", ATTACKER)):
            assert upload_adapter(client, server, task, weights, config).status_code == 201
            made = client.post(
                server.url + "/admin/keys", headers=server.admin_headers,
                json={"name": tenant, "scopes": [task.split(":")[0] + ":*"]},
            )  # fmt: skip
            made.raise_for_status()
            keys[tenant] = made.json()["key"]
    return server, keys


def _markdown(result: dict[str, Any]) -> str:
    rows = [
        "## Hostile tenants (`bench/abuse.py`)",
        "",
        f"Victim: one tenant's 8-token greedy `/generate`, back to back, {result['seconds']} s per phase,",
        "while the other tenant attacks. Bound: victim p99 <= 3 x no-attack p99 + one engine step (mean",
        "step time during that attack, from the server's own histogram). Same run, same machine.",
        "",
        "| phase | victim requests | p50 ms | p99 ms | p99 / no-attack | mean step ms | bound ms | within |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = result["phases"]["no_attack"]["p99_ms"]
    for name, row in result["phases"].items():
        rows.append(
            f"| {name} | {row['num_requests']} | {row['p50_ms']} | {row['p99_ms']} "
            f"| {row['p99_ms'] / base:.2f} | {row['mean_step_ms']} | {row.get('bound_ms', '')} "
            f"| {row.get('within', '')} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="victim measuring time per phase")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "abuse.json")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server, keys = _setup(Path(tmp))
        try:
            phases = {"no_attack": asyncio.run(_phase(server.url, keys, None, args.seconds))}
            for name in args.attacks.split(","):
                phases[name] = asyncio.run(_phase(server.url, keys, name, args.seconds))
                print(name, phases[name], flush=True)
        finally:
            server.stop()
    base_p99 = phases["no_attack"]["p99_ms"]
    for name, row in phases.items():
        if name != "no_attack":
            row["bound_ms"] = round(3 * base_p99 + row["mean_step_ms"], 2)
            row["within"] = row["p99_ms"] <= row["bound_ms"]
    result = {
        "seconds": args.seconds,
        "phases": phases,
        "all_within": all(r.get("within", True) for r in phases.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_docs:
        write_section(ROOT / "docs" / "benchmarks.md", "abuse", _markdown(result))
    print(_markdown(result))
    return 0 if result["all_within"] else 1


if __name__ == "__main__":
    sys.exit(main())
