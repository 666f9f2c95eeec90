"""`make demo`: train three small prefix tasks on the demo model, upload them to a server and
print one mixed batch of their answers side by side.

Small on purpose (a few minutes on 2 CPU cores): 120 training examples, P=8, 300 steps each.
It prints one line per trained task, a few answers per task, and per task how many of 20
held-out inputs (restaurant MRs, greeter names, weather cities never seen in training) had
all their values copied into the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from clients.client import AsyncPrefixClient, PrefixClient
from examples.table_to_text.make_data import mr_text, unique_mrs
from examples.table_to_text.serve import demo_server
from trainer.copy_corpus import town
from trainer.demo_corpus import CITIES, NAMES, restaurant_sentence, venue
from trainer.train import build_parser, train

SKIES = ["sunny", "cloudy", "rainy", "windy", "foggy"]
# Held-out values: the tasks never train on them, so answering with them means copying them.
HELD_OUT_NAMES = NAMES[::4] + ["The Red Lion", "The Anchor", "Little Italy", "The Old Bell",
                               "Mango Tree", "The Copper Pot"]  # fmt: skip
HELD_OUT_CITIES = ["Bristol", "Bath", "Durham", "Exeter", "Norwich", "Chester"]


@dataclass(frozen=True)
class Example:
    """One input with its reference answer and the values the answer must copy from it."""

    input: str
    output: str
    values: tuple[str, ...]


def _weather(rng: random.Random, cities: list[str]) -> Example:
    city, sky, high = rng.choice(cities), rng.choice(SKIES), str(rng.randint(8, 28))
    return Example(
        f"city[{city}], sky[{sky}], high[{high}] => ",
        f"Today in {city} it will be {sky} with a high of {high} degrees.",
        (city, sky, high),
    )


def _greeting(rng: random.Random, names: list[str]) -> Example:
    place = rng.choice(names)
    reply = f"Hello! Welcome to {place}. How can I help you today?"
    return Example(f"greet name[{place}] => ", reply, (place,))


def _restaurant(mr: dict[str, str], rng: random.Random) -> Example:
    # familyFriendly[yes] is said as "family friendly", not copied; every other value is said as is
    values = tuple(v for k, v in mr.items() if k != "familyFriendly")
    return Example(mr_text(mr) + " => ", restaurant_sentence(mr, rng), values)


def datasets(
    n: int, held_out: int, seed: int, open_values: bool = False
) -> dict[str, tuple[list[Example], list[Example]]]:
    """Per task (training examples, held-out examples); the held-out restaurant MRs, greeter
    names and weather cities never occur in training. `open_values`: the greeter's and the
    weather's training inputs use made-up names and towns (one per example), not the corpus's few."""
    rng = random.Random(seed)
    mrs = unique_mrs(n + held_out, rng, 3)
    names = [x for x in NAMES if x not in HELD_OUT_NAMES]
    cities = [c for c in CITIES if c not in HELD_OUT_CITIES]
    if open_values:
        values_rng = random.Random(seed + 1)
        names = [venue(values_rng, open_names=1.0) for _ in range(n)]
        cities = [town(values_rng) for _ in range(n)]
    return {
        "demo:restaurant": (
            [_restaurant(m, rng) for m in mrs[:n]],
            [_restaurant(m, rng) for m in mrs[n:]],
        ),
        "demo:weather": (
            [_weather(rng, cities) for _ in range(n)],
            [_weather(rng, HELD_OUT_CITIES) for _ in range(held_out)],
        ),
        "demo:greeter": (
            [_greeting(rng, names) for _ in range(n)],
            [_greeting(rng, HELD_OUT_NAMES) for _ in range(held_out)],
        ),
    }


def copied(example: Example, answer: str) -> int:
    """How many of the example's values the answer contains verbatim."""
    return sum(value in answer for value in example.values)


def _train_task(task: str, rows: list[Example], work: Path, max_steps: int) -> Path:
    folder = work / task.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"input": r.input, "output": r.output}) + "\n" for r in rows))
    argv = ["--data", str(data), "--out", str(folder), "--prefix-len", "8", "--max-steps",
            str(max_steps), "--batch-size", "8", "--lr", "1e-2", "--quiet"]  # fmt: skip
    result = train(build_parser().parse_args(argv))
    print(f"trained {task:<16} {len(rows)} examples, loss {result.train_losses[0]:.2f} -> "
          f"{result.train_losses[-1]:.2f} in {result.seconds:.0f}s", flush=True)  # fmt: skip
    return result.prefix_path


async def _mixed_batch(url: str, prompts: list[tuple[str, str]]) -> list[str]:
    async with AsyncPrefixClient(url) as client:
        outs = await asyncio.gather(
            *(client.generate(t, p, max_new_tokens=80, temperature=0.0) for t, p in prompts)
        )
    return [o.text for o in outs]


def _report(sets: dict[str, tuple[list[Example], list[Example]]], answers: list[str], shown: int) -> None:
    """A few answers per task side by side, then every task's copy rate over its held-out inputs."""
    by_task: dict[str, list[tuple[Example, str]]] = {task: [] for task in sets}
    held = [(task, ex) for task, (_, rows) in sets.items() for ex in rows]
    for (task, ex), answer in zip(held, answers, strict=True):
        by_task[task].append((ex, answer.strip()))
    print(f"\none mixed batch: {len(held)} held-out inputs of {len(sets)} tasks; the first {shown} of each:")
    for task, pairs in by_task.items():
        for ex, answer in pairs[:shown]:
            print(f"{task:<16} {ex.input:<58} | {answer}")
    print("\nvalues (names, cities, numbers, ...) copied into the answer, held-out inputs:")
    for task, pairs in by_task.items():
        full = sum(copied(e, a) == len(e.values) for e, a in pairs)
        values = sum(copied(e, a) for e, a in pairs)
        print(f"{task:<16} all values copied in {full}/{len(pairs)} inputs ({100 * full / len(pairs):.0f}%); "
              f"{values}/{sum(len(e.values) for e, _ in pairs)} values")  # fmt: skip


def quiet_libraries() -> None:
    """No weight-loading bars and no deprecation notices of PEFT's calls into transformers: the
    demo prints one line per task, then the result."""
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="(torch|transformers|peft)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/prefix-demo"))
    p.add_argument("--examples", type=int, default=120)
    p.add_argument("--held-out", type=int, default=20, help="held-out inputs per task for the copy rate")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument(
        "--closed-values", action="store_true", help="train on the corpus's few names and cities (recall)"
    )
    a = p.parse_args()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread trains ~4x faster than two
    quiet_libraries()
    start = time.monotonic()
    sets = datasets(a.examples, a.held_out, seed=1, open_values=not a.closed_values)
    print(f"training {len(sets)} prefix tasks on the demo model (P=8, {a.max_steps} steps each)", flush=True)
    paths = {task: _train_task(task, rows, a.work, a.max_steps) for task, (rows, _) in sets.items()}
    with demo_server() as server:
        with PrefixClient(server.url, token=server.admin_token) as client:
            for task, path in paths.items():
                client.upload(task, path)
        prompts = [(task, ex.input) for task, (_, rows) in sets.items() for ex in rows]
        order = list(range(len(prompts)))
        random.Random(0).shuffle(order)  # one batch, tasks interleaved
        shuffled = asyncio.run(_mixed_batch(server.url, [prompts[i] for i in order]))
    answers = [""] * len(prompts)
    for i, answer in zip(order, shuffled, strict=True):
        answers[i] = answer
    _report(sets, answers, shown=2)
    print(f"\nmake demo took {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
