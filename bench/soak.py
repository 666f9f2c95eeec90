"""Soak: minutes of mixed traffic from many concurrent clients against a real server (by hand; never in CI).

Starts its own `prefix-serve` (a tiny GPT-2 with wide greedy margins, its embedded Redis under a
temporary data dir: never the shared Redis on 6379), uploads 16 tasks of different prefix lengths
and kinds (canonical tensor, PEFT checkpoint, text), then runs `--clients` asyncio clients on
loopback for `--duration` seconds. Each client loops over a weighted mix: greedy and seeded
sampling on `/generate` (plain and streamed) and `/v1/completions` (plain and streamed),
cancellations (a stream closed after a few tokens, a request abandoned after a short timeout),
bad requests (each must get its exact 4xx status and error code), admin uploads of new versions
of the three "churn" tasks, and admin reads.

Answers are verified, not only counted: every answer to the same (task, prefix version, prompt,
sampling) must be identical token for token whichever endpoint served it, streamed or not; every
200 must have the contract's shape (token count = usage, finish reason consistent with the
tokens and `max_new_tokens`, the prefix length of the version it names); no 5xx ever.
A request is *lost* when it got neither a full answer nor was deliberately cancelled by its client.
The server's RSS is sampled every few seconds: growth after the warm-up must stay under 5%, and
the running/waiting/loading gauges must be back to 0 once the traffic stops.

Also reported, as warnings rather than failures: 5xx that only the server's own
`prefix_server_requests_total` recorded, and ERROR lines in its log.

Writes `bench/results/soak.json` and the soak section of `docs/benchmarks.md`; exits 1 if anything failed.
`--duration 60` is a quick check; `--mix generate=1,bad_request=1` narrows the traffic (to bisect).
Generation requests carry the headers of `client_headers()`: the one place to add an API key.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.doc_sections import write_section  # noqa: E402
from bench.soak_checks import LOST, WRONG, Ctx, Lost, Mismatch, Tally, final_checks  # noqa: E402
from bench.soak_report import (  # noqa: E402
    METRICS_TOKEN,
    after_run,
    markdown,
    report,
    rss_summary,
    summary_lines,
    table,
    warnings_of,
)
from bench.soak_traffic import OPS, bad_cases, create_keys  # noqa: E402
from bench.soak_workload import (  # noqa: E402
    MAX_NEW_LIMIT,
    MAX_POSITIONS,
    MAX_UPLOAD_BYTES,
    MIX,
    Options,
    TaskSpec,
    canonical_prefix,
    client_headers,
    prompt_specs,
    random_text,
    task_specs,
)
from tests.server_process import ServerProcess  # noqa: E402
from tests.tiny_models import save_adapter, save_tiny_model  # noqa: E402

REQUEST_TIMEOUT_S = 60.0


# ---- setup --------------------------------------------------------------------------------------
def model_facts(model_dir: Path) -> tuple[tuple[int, int, int], frozenset[int]]:
    """The canonical prefix layout and the EOS ids (generation config first, as the server does)."""
    config = json.loads((model_dir / "config.json").read_text())
    layout = (config["n_layer"], config["n_head"], config["n_embd"] // config["n_head"])
    gen_path = model_dir / "generation_config.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.exists() else None
    eos = config["eos_token_id"] if eos is None else eos
    return layout, frozenset(eos if isinstance(eos, list) else [eos])


def build_adapters(model_dir: Path, workdir: Path) -> dict[str, tuple[bytes, bytes]]:
    """PEFT prefix-tuning checkpoints (weights, config) for the PEFT tasks."""
    out: dict[str, tuple[bytes, bytes]] = {}
    for task in task_specs():
        if task.kind == "peft":
            adapter = save_adapter(
                model_dir, workdir / "adapters" / task.task_id, task.prefix_len, seed=len(out)
            )
            out[task.task_id] = (adapter.weights, adapter.config)
    return out


async def upload_initial(
    ctx: Ctx, task: TaskSpec, adapters: dict[str, tuple[bytes, bytes]], seed: int
) -> None:
    files: Any
    if task.kind == "peft":
        weights, config = adapters[task.task_id]
        files = {"weights": ("adapter_model.safetensors", weights), "config": ("adapter_config.json", config)}
    elif task.kind == "text":
        files = {"text": (None, random_text(random.Random(seed), task.prefix_len).encode())}
    else:
        files = {"weights": ("prefix.safetensors", canonical_prefix(ctx.layout, task.prefix_len, seed))}
    response = await ctx.http.put(f"/admin/prefixes/{task.task_id}", files=files, headers=ctx.admin)
    response.raise_for_status()
    body = response.json()
    if body["prefix_len"] != task.prefix_len:
        raise RuntimeError(
            f"{task.task_id}: uploaded prefix_len {body['prefix_len']}, wanted {task.prefix_len}"
        )
    ctx.versions.upload(task.task_id, body["version"], task.prefix_len)


def make_decoder(tokenizer: Any) -> Callable[[tuple[int, ...]], str]:
    @functools.lru_cache(maxsize=100_000)
    def decode(ids: tuple[int, ...]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))

    return decode


async def make_ctx(http: httpx.AsyncClient, served: Served, seed: int, use_keys: bool) -> Ctx:
    """The shared client state, after uploading every task's first version (and, with keys,
    creating one key per tenant: from then on generation needs a key)."""
    layout, eos_ids = model_facts(served.model_dir)
    tasks = task_specs()
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    ctx = Ctx(
        http=http,
        headers=client_headers(),
        admin={"Authorization": f"Bearer {served.admin_token}"},
        tasks=tasks,
        prompts=prompt_specs(tokenizer, random.Random(seed)),
        eos_ids=eos_ids,
        layout=layout,
        bad_cases=bad_cases(tasks[0], layout),
        decode=make_decoder(tokenizer),
    )
    for i, task in enumerate(tasks):
        await upload_initial(ctx, task, served.adapters, seed * 100 + i)
    if use_keys:
        await create_keys(ctx)
    return ctx


# ---- measurement --------------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def redis_child(pid: int) -> int | None:
    """The embedded redis-server started by the server, if any."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if Path(f"/proc/{child}/comm").read_text().strip() == "redis-server":
            return int(child)
    return None


async def sample_rss(
    pid: int, interval: float, samples: list[tuple[float, int, int]], stop: asyncio.Event
) -> None:
    """(seconds since the traffic began, server RSS KiB, embedded Redis RSS KiB) every `interval`."""
    started, redis = time.monotonic(), redis_child(pid)
    while True:
        samples.append((time.monotonic() - started, rss_kib(pid), rss_kib(redis) if redis else 0))
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except TimeoutError:
            pass


# ---- the run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """The server under test and what it was started with."""

    url: str
    pid: int
    admin_token: str
    model_dir: Path
    adapters: dict[str, tuple[bytes, bytes]]


async def run_op(ctx: Ctx, tally: Tally, kind: str, rng: random.Random) -> None:
    started = time.perf_counter()
    detail = ""
    status: int | None
    try:
        outcome, status = await OPS[kind](ctx, rng)
    except Mismatch as exc:
        outcome, status, detail = WRONG, exc.status, str(exc)
    except (httpx.TransportError, Lost) as exc:  # timeouts, resets, truncated streams
        outcome, status, detail = LOST, None, f"{type(exc).__name__}: {exc}"
    tally.record(kind, outcome, status or None, time.perf_counter() - started, detail)


async def client(ctx: Ctx, tally: Tally, rng: random.Random, deadline: float, mix: dict[str, int]) -> None:
    kinds, weights = list(mix), list(mix.values())
    while time.monotonic() < deadline:
        await run_op(ctx, tally, rng.choices(kinds, weights)[0], rng)


async def soak(opts: Options, served: Served) -> dict[str, Any]:
    # idle connections expire well before uvicorn's 5 s keep-alive timeout: reusing one the server is
    # closing at that very moment is HTTP/1.1's known race, not a lost request
    limits = httpx.Limits(
        max_connections=opts.clients + 8, max_keepalive_connections=opts.clients + 8, keepalive_expiry=1.0
    )
    async with httpx.AsyncClient(base_url=served.url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        ctx = await make_ctx(http, served, opts.seed, opts.use_keys)
        tally, stop = Tally(), asyncio.Event()
        samples: list[tuple[float, int, int]] = []
        sampler = asyncio.create_task(sample_rss(served.pid, opts.rss_interval, samples, stop))
        started = time.monotonic()
        deadline = started + opts.duration
        rngs = [random.Random(opts.seed * 1000 + i) for i in range(opts.clients)]
        await asyncio.gather(*(client(ctx, tally, rng, deadline, opts.mix) for rng in rngs))
        traffic_s = time.monotonic() - started
        after = await after_run(http)
        await final_checks(ctx, tally)
        stop.set()
        await sampler
    return report(opts, tally, traffic_s, rss_summary(samples, opts.warmup), after, ctx)


# ---- output -----------------------------------------------------------------------------------
def write_outputs(result: dict[str, Any], opts: Options) -> None:
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    if opts.docs is not None:
        write_section(opts.docs, "soak", markdown(result))  # the throughput section stays


# ---- main -------------------------------------------------------------------------------------
def parse_args() -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before the RSS baseline (default 20%% of --duration)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    parser.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="markdown report (its soak section)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write the markdown report")
    parser.add_argument("--no-keys", action="store_true", help="development mode: no API keys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument(
        "--mix", type=parse_mix, default=MIX, help="KIND=WEIGHT,... instead of the default mix (to bisect)"
    )
    args = parser.parse_args()
    warmup = 0.2 * args.duration if args.warmup is None else args.warmup
    docs = None if args.no_docs else args.docs
    return Options(
        args.duration,
        args.clients,
        warmup,
        args.out,
        docs,
        args.seed,
        args.rss_interval,
        args.mix,
        not args.no_keys,
    )


def parse_mix(text: str) -> dict[str, int]:
    mix = {kind: int(weight) for kind, weight in (item.split("=") for item in text.split(","))}
    unknown = set(mix) - set(MIX)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kinds {sorted(unknown)}; known: {', '.join(MIX)}")
    return mix


def server_flags(model_dir: Path, admin_token: str) -> list[str]:
    return [
        "--model", str(model_dir), "--admin-token", admin_token, "--max-model-len", str(MAX_POSITIONS),
        "--max-new-tokens", str(MAX_NEW_LIMIT), "--max-upload-bytes", str(MAX_UPLOAD_BYTES),
        "--log-level", "warning", "--metrics-token", METRICS_TOKEN,
    ]  # fmt: skip


def server_log_errors(server: ServerProcess) -> dict[str, Any]:
    """ERROR lines of the server's log (it runs at --log-level warning) and the first traceback in full."""
    lines = server.log_path.read_text(errors="replace").splitlines() if server.log_path.exists() else []
    errors = [i for i, line in enumerate(lines) if " ERROR " in line]
    first = lines[errors[0] : errors[0] + 60] if errors else []
    kinds = Counter(line for line in lines if line and not line.startswith((" ", "Traceback", "The above")))
    return {
        "num_error_lines": len(errors),
        "first_error": first,
        "exception_lines": dict(
            Counter({k: n for k, n in kinds.items() if "Error" in k or "Exception" in k})
        ),
    }


def main() -> None:
    opts = parse_args()
    torch.set_num_threads(1)  # the server needs the cores; this process only builds small tensors
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        model_dir = save_tiny_model("gpt2", workdir / "model", max_positions=MAX_POSITIONS)
        adapters = build_adapters(model_dir, workdir)
        admin_token = secrets.token_urlsafe(16)
        server = ServerProcess(workdir / "data", *server_flags(model_dir, admin_token))
        server.start(timeout_s=300)
        try:
            assert server._proc is not None  # the child's pid: its RSS is what we watch
            served = Served(server.url, server._proc.pid, admin_token, model_dir, adapters)
            result = asyncio.run(soak(opts, served))
        finally:
            server.stop()
        result["server_log"] = server_log_errors(server)
    result["warnings"] = warnings_of(result)
    write_outputs(result, opts)
    print("\n".join(table(result)), "", *summary_lines(result), sep="\n")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
